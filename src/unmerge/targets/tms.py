"""Toy model of superposition (Elhage et al. 2022): `x̂ = ReLU(Wᵀ W x + b)` with tied weights.

With `identity=True` a fixed m×m identity sits between W and Wᵀ: a site whose true mechanism is one
rank-m component, so that a decomposition must keep it whole rather than split it per feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import TMSConfig
from unmerge.targets.base import GroundTruth, sparse_uniform


class TransposedLinear(nn.Module):
    """`y = x Wᵀᵀ + b`: applies the transpose of another Linear's weight (tied weights) plus its own bias."""

    def __init__(self, tied_to: nn.Linear) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(tied_to.in_features))
        self._tied_to = (tied_to,)  # a tuple, so the tied module is not registered (and saved) twice

    @property
    def weight(self) -> Tensor:
        return self._tied_to[0].weight.T

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class TMSModel(nn.Module):
    """Sites: `linear1` (W, m×n), optional `hidden` (fixed identity), `linear2` (Wᵀ, tied to linear1)."""

    def __init__(self, config: TMSConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(config.n_features, config.n_hidden, bias=False)
        self.hidden = nn.Linear(config.n_hidden, config.n_hidden, bias=False) if config.identity else None
        if self.hidden is not None:
            with torch.no_grad():
                self.hidden.weight.copy_(torch.eye(config.n_hidden))
            self.hidden.weight.requires_grad_(False)
        self.linear2 = TransposedLinear(self.linear1)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.linear1(x)
        if self.hidden is not None:
            hidden = self.hidden(hidden)
        return F.relu(self.linear2(hidden))


def tms_inputs(config: TMSConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """Features active with probability p, values U[0, 1]."""
    return sparse_uniform(batch_size, config.n_features, config.feature_probability, 0.0, 1.0, generator)


def tms_loss(model: TMSModel, x: Tensor) -> Tensor:
    """Autoencoding MSE."""
    return F.mse_loss(model(x), x)


def tms_ground_truth(config: TMSConfig) -> GroundTruth:
    """One mechanism per feature (column i of W with e_i, in both tied sites); the identity is one rank-m mechanism."""
    dense = {"hidden": (["hidden"], config.n_hidden)} if config.identity else {}
    return GroundTruth(
        n_features=config.n_features,
        feature_sites={"linear1": ["linear1"], "linear2": ["linear2"]},
        dense_sites=dense,
        feature_directions={"linear1": "in", "linear2": "out"},
    )
