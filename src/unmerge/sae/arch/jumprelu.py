"""JumpReLU (Rajamanoharan et al. 2024): `f = z·H(z − θ)` with a learned threshold per latent (straight-through
gradient for θ with a rectangle kernel), made sparse by an L0 penalty `Σ H(z − θ)` or by the sparsity penalty."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unmerge.config import JumpReLUConfig
from unmerge.sae import activations
from unmerge.sae.dictionary import Dictionary, LossInputs


class JumpReLUDictionary(Dictionary):
    """θ is stored as itself (not log θ), so the L0 penalty moves it as fast as the biases move, and kept ≥ 0."""

    activation = "jumprelu"
    saelens_name = "jumprelu"
    saelens_transcoders = {False: "jumprelu_transcoder"}
    config: JumpReLUConfig

    def __init__(
        self, dim: int, config: JumpReLUConfig, generator: torch.Generator, output_dim: int | None = None
    ) -> None:
        super().__init__(dim, config, generator, output_dim)
        self.threshold = nn.Parameter(torch.full((config.width,), config.jumprelu_init_threshold))

    def activate(self, z: Tensor) -> Tensor:
        return activations.jumprelu(z, self.threshold, self.config.jumprelu_bandwidth)

    def extra_losses(self, inputs: LossInputs) -> dict[str, tuple[Tensor, float]]:
        """The L0 penalty, when `l0_coeff` is set."""
        if not self.config.l0_coeff:
            return {}
        l0 = activations.jumprelu_l0(inputs.z, self.threshold, self.config.jumprelu_bandwidth)
        return {"l0": (l0, self.config.l0_coeff)}

    @torch.no_grad()
    def constrain(self) -> None:
        """θ ≥ 0: below 0 a latent could go negative."""
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def reset_latents(self, rows: Tensor) -> list[tuple[nn.Parameter, Any]]:
        """A resampled latent's θ starts again from its initial value."""
        self.threshold[rows] = self.config.jumprelu_init_threshold
        return [(self.threshold, rows)]

    def target_unit_tensors(self) -> list[Tensor]:
        return [*super().target_unit_tensors(), self.threshold]

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold}

    @torch.no_grad()
    def load_saelens_extras(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"].clamp(min=0))  # latents stay ≥ 0: θ < 0 acts as θ = 0
