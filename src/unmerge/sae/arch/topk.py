"""TopK (Gao et al. 2024): each example keeps its k largest pre-activations, encoded and decoded through those k
alone (`unmerge.sae.sparse_decode`); AuxK trains dead latents to model the residual."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from unmerge.config import TopKConfig
from unmerge.sae import activations
from unmerge.sae.dictionary import Dictionary, LossInputs
from unmerge.sae.sparse_decode import dense_latents, sparse_decode, topk_encode


def aux_k_loss(x: Tensor, reconstruction: Tensor, z: Tensor, W_d: Tensor, dead: Tensor, k: int) -> Tensor:
    """AuxK (Gao et al. 2024): the k largest pre-activations among dead latents reconstruct the main
    reconstruction's residual `e = x − x̂` (detached, so it trains only the dead latents). The decoder bias is
    already inside x̂, so the auxiliary reconstruction `f_aux W_d` does not add it again. Normalised by the
    residual's own squared norm, so the term is scale-free."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return z.new_zeros(())
    residual = (x - reconstruction).detach()
    dead_z = z.masked_fill(~dead, float("-inf"))
    auxiliary = activations.topk(dead_z, min(k, n_dead)) @ W_d
    return (residual - auxiliary).square().sum(-1).mean() / residual.square().sum(-1).mean().clamp(min=1e-12)


class TopKDictionary(Dictionary):
    """Keep each example's k largest pre-activations (ReLU'd); its dense f, formed for the caller (firing counts,
    penalties), is not on the decoder's gradient path."""

    activation = "topk"
    saelens_name = "topk"
    config: TopKConfig

    def activate(self, z: Tensor) -> Tensor:
        return activations.topk(z, self.config.k)

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, indices, z = topk_encode(x, self.W_e, self.b_e, self.centre(), self.config.k)
        reconstruction = self.add_skip(sparse_decode(values, indices, self.W_d, self.b_d), x)
        return reconstruction, dense_latents(values, indices, self.config.width), z

    def extra_losses(self, inputs: LossInputs) -> dict[str, tuple[Tensor, float]]:
        """AuxK, when `aux_k` is set."""
        if not self.config.aux_k:
            return {}
        loss = aux_k_loss(inputs.target, inputs.reconstruction, inputs.z, self.W_d, inputs.dead(), self.config.aux_k)
        return {"aux_k": (loss, self.config.aux_k_coeff)}

    @classmethod
    def saelens_config_fields(cls, saelens_config: dict[str, Any]) -> dict[str, Any]:
        return {"k": saelens_config.get("k", 100)}

    def saelens_settings(self) -> dict[str, Any]:
        return {"k": self.config.k, "rescale_acts_by_decoder_norm": False}
