"""BatchTopK (Bussmann et al. 2024): the batch keeps its k·B largest pre-activations in training; a running
threshold, estimated from the smallest kept activation, replaces the batch rule in evaluation (and in SAELens,
which stores it as a JumpReLU)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unmerge.config import BatchTopKConfig
from unmerge.sae import activations
from unmerge.sae.arch.topk import TopKDictionary
from unmerge.sae.dictionary import Dictionary
from unmerge.train import distributed

THRESHOLD_MOMENTUM = 0.99


class BatchTopKDictionary(TopKDictionary):
    """Batch rule in training mode, the learned threshold `z · 1[z > θ]` in evaluation mode; AuxK as TopK."""

    activation = "batchtopk"
    saelens_name = "jumprelu"
    saelens_imported = False  # read back as the JumpReLU it is saved as
    config: BatchTopKConfig

    def __init__(
        self, dim: int, config: BatchTopKConfig, generator: torch.Generator, output_dim: int | None = None
    ) -> None:
        super().__init__(dim, config, generator, output_dim)
        self.register_buffer("inference_threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def activate(self, z: Tensor) -> Tensor:
        if not self.training:
            return activations.threshold_activation(z, self.inference_threshold)
        f, smallest = activations.batch_topk(z, self.config.k, across_ranks=True)
        self._update_threshold(smallest)
        return f

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Dense, as the base class: the batch rule needs every pre-activation of the batch."""
        return Dictionary.forward_normalised(self, x)

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        """Running mean of the smallest kept activation: exponential with a bias correction, so early batches
        count fully and the result does not depend on the starting value."""
        smallest_kept = distributed.mean_tensor(smallest_kept)  # every rank keeps the same threshold
        self.threshold_updates += 1
        weight = (1 - THRESHOLD_MOMENTUM) / (1 - THRESHOLD_MOMENTUM ** int(self.threshold_updates))
        self.inference_threshold.lerp_(smallest_kept, weight)

    def target_unit_tensors(self) -> list[Tensor]:
        return [*super().target_unit_tensors(), self.inference_threshold]

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {**super().saelens_tensors(), "threshold": self.inference_threshold.expand(self.config.width)}

    def saelens_settings(self) -> dict[str, Any]:
        """None of TopK's: SAELens reads the file as the JumpReLU it is saved as."""
        return {}
