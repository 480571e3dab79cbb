"""Gated (Rajamanoharan et al. 2024): a gate path decides which latents fire (`z > 0`), a magnitude path with the
same directions rescaled by `exp(r_mag)` sets how much; the gate also reconstructs the target through a frozen
copy of the decoder, so it learns what to open, and the sparsity penalty falls on `ReLU(z)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import GatedConfig
from unmerge.sae.dictionary import Dictionary, LossInputs, squared_error


def gated_auxiliary_loss(target: Tensor, gate: Tensor, W_d: Tensor, offset: Tensor) -> Tensor:
    """The gate path's `ReLU(π_gate)` must reconstruct the target through a frozen copy of the decoder (and of
    `offset`, the part no latent makes), so this term trains the encoder (gate) but never the decoder."""
    return squared_error(target, F.relu(gate) @ W_d.detach() + offset.detach())


class GatedDictionary(Dictionary):
    """`f = ReLU(π_mag) · 1[z > 0]` with `π_mag = (x − b_d) W_e ⊙ exp(r_mag) + b_mag`; z is the gate's."""

    activation = "gated"
    saelens_name = "gated"
    saelens_encoder_bias = "b_gate"
    config: GatedConfig

    def __init__(
        self, dim: int, config: GatedConfig, generator: torch.Generator, output_dim: int | None = None
    ) -> None:
        super().__init__(dim, config, generator, output_dim)
        self.r_mag = nn.Parameter(torch.zeros(config.width))
        self.b_mag = nn.Parameter(torch.zeros(config.width))

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        projection = (x - self.centre()) @ self.W_e
        z = projection + self.b_e
        magnitude = projection * self.r_mag.exp() + self.b_mag
        f = F.relu(magnitude) * (z > 0)
        return self.decode(f, x), f, z

    def penalised(self, f: Tensor, z: Tensor) -> Tensor:
        """The gate's `ReLU(z)`: the penalty keeps gates shut."""
        return F.relu(z)

    def extra_losses(self, inputs: LossInputs) -> dict[str, tuple[Tensor, float]]:
        loss = gated_auxiliary_loss(inputs.target, inputs.z, self.W_d, self.offset(inputs.x))
        return {"gate_reconstruction": (loss, 1.0)}

    def target_unit_tensors(self) -> list[Tensor]:
        return [*super().target_unit_tensors(), self.b_mag]

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {**super().saelens_tensors(), "r_mag": self.r_mag, "b_mag": self.b_mag}

    @torch.no_grad()
    def load_saelens_extras(self, tensors: dict[str, Tensor]) -> None:
        self.r_mag.copy_(tensors["r_mag"])
        self.b_mag.copy_(tensors["b_mag"])
