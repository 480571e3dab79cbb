"""What a dictionary trains on: a sampler of activation rows and, for data with known features, the truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Sampler = Callable[[int, torch.Generator], Tensor]
Reconstruct = Callable[[Tensor], tuple[Tensor, Tensor]]  # a dictionary: activations (n, d) → (x̂, latents)


@dataclass(frozen=True)
class ActivationSource:
    """A batch sampler of d-dimensional activations and, for toys, the true features (rows of `true_features`,
    unit norm, in the space the decoder writes to), their coefficients' generator for shrinkage measurements and,
    for the hierarchy toy, each feature's parent index (−1: none).

    A transcoder's source has an `output_dim`: each sampled row is a block's input followed by its output,
    `(batch, dim + output_dim)`, so pairs stay together through the one training loop (`split`)."""

    name: str
    dim: int
    sample: Sampler
    true_features: Tensor | None = None
    sample_with_coefficients: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] | None = None
    parents: Tensor | None = None
    output_dim: int | None = None

    @property
    def row_width(self) -> int:
        """Columns of a sampled batch: the input's, plus the output's for a transcoder source."""
        return self.dim + (self.output_dim or 0)

    def split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, reconstruction targets) of a sampled batch: a transcoder's (input, output), else (x, x)."""
        if self.output_dim is None:
            return batch, batch
        return batch[:, : self.dim], batch[:, self.dim :]
