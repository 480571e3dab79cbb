"""Residual MLP doing compressed computation (Braun et al. 2025; Bushnaq et al. 2025).

A fixed random embedding `W_E` (unit-norm rows) writes n features into a wider residual stream; L blocks
`resid += W_out ReLU(W_in resid)` (no biases) must compute `y_i = x_i + ReLU(x_i)` for every feature with fewer
neurons than features; the read-off is `resid W_Eᵀ`. True mechanisms: `W_in` splits into one direction per
feature, `W_out` (across all layers) acts as one dense mechanism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import ResidMLPConfig
from unmerge.targets.base import GroundTruth, sparse_uniform


class MLPBlock(nn.Module):
    """`W_out ReLU(W_in x)` without biases."""

    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, resid: Tensor) -> Tensor:
        return self.mlp_out(F.relu(self.mlp_in(resid)))


class ResidMLP(nn.Module):
    """Sites `layers.{i}.mlp_in` and `layers.{i}.mlp_out`; `W_E` is a fixed buffer."""

    def __init__(self, config: ResidMLPConfig, embedding_seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(embedding_seed)
        embedding = torch.randn(config.n_features, config.d_embed, generator=generator)
        self.register_buffer("W_E", F.normalize(embedding, dim=1))
        self.layers = nn.ModuleList(MLPBlock(config.d_embed, config.d_mlp) for _ in range(config.n_layers))

    def forward(self, x: Tensor) -> Tensor:
        resid = x @ self.W_E
        for layer in self.layers:
            resid = resid + layer(resid)
        return resid @ self.W_E.T


def resid_mlp_inputs(config: ResidMLPConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """Features active with probability p, values U[−1, 1]."""
    return sparse_uniform(batch_size, config.n_features, config.feature_probability, -1.0, 1.0, generator)


def resid_mlp_loss(model: ResidMLP, x: Tensor) -> Tensor:
    """MSE between the read-off and the labels `x + ReLU(x)`."""
    return F.mse_loss(model(x), x + F.relu(x))


def resid_mlp_ground_truth(config: ResidMLPConfig) -> GroundTruth:
    """`W_in` of all layers: one subcomponent per feature; `W_out` of all layers: one dense mechanism."""
    layers = range(config.n_layers)
    return GroundTruth(
        n_features=config.n_features,
        feature_sites={"W_in": [f"layers.{i}.mlp_in" for i in layers]},
        dense_sites={"W_out": ([f"layers.{i}.mlp_out" for i in layers], config.d_mlp * config.n_layers)},
    )
