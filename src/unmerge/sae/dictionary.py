"""The dictionary: `z = (x − b_d) W_e + b_e`, `f = act(z)`, `x̂ = f W_d + b_d` (DESIGN.md §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import DictionaryConfig
from unmerge.sae import activations

BATCHTOPK_THRESHOLD_MOMENTUM = 0.99


class Dictionary(nn.Module):
    """Encoder `W_e` (d × m), `b_e`; decoder `W_d` (m × d, rows are atoms), `b_d`; JumpReLU's `log θ` or
    BatchTopK's running inference threshold where the activation needs them."""

    def __init__(self, dim: int, config: DictionaryConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        decoder = F.normalize(torch.randn(config.width, dim, generator=generator), dim=1) * config.init_decoder_norm
        self.W_d = nn.Parameter(decoder)
        self.W_e = nn.Parameter(decoder.T.clone())
        self.b_e = nn.Parameter(torch.zeros(config.width))
        self.b_d = nn.Parameter(torch.zeros(dim))
        if config.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((config.width,), config.jumprelu_init_threshold).log())
        if config.activation == "batchtopk":
            self.register_buffer("inference_threshold", torch.zeros(()))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_d) @ self.W_e + self.b_e

    def activate(self, z: Tensor) -> Tensor:
        """Latents from pre-activations; BatchTopK uses its batch rule in training mode, its threshold in eval."""
        config = self.config
        if config.activation == "relu":
            return F.relu(z)
        if config.activation == "topk":
            return activations.topk(z, config.k)
        if config.activation == "jumprelu":
            return activations.jumprelu(z, self.log_threshold.exp(), config.jumprelu_bandwidth)
        if not self.training:
            return activations.threshold_activation(z, self.inference_threshold)
        f, smallest = activations.batch_topk(z, config.k)
        self._update_threshold(smallest)
        return f

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        """Running mean of the smallest kept activation: exponential with a bias correction, so early batches
        count fully and the result does not depend on the starting value."""
        self.threshold_updates += 1
        weight = (1 - BATCHTOPK_THRESHOLD_MOMENTUM) / (1 - BATCHTOPK_THRESHOLD_MOMENTUM ** int(self.threshold_updates))
        self.inference_threshold.lerp_(smallest_kept, weight)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_d + self.b_d

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction x̂, latents f, pre-activations z)."""
        z = self.pre_activations(x)
        f = self.activate(z)
        return self.decode(f), f, z

    def decoder_norms(self) -> Tensor:
        return self.W_d.norm(dim=1)
