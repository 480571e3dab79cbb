"""Sparse feature data with known ground truth (Sharkey, Braun & Millidge 2022; DESIGN.md §6).

`n_features` unit-norm Gaussian directions in R^d; feature i fires with probability ∝ `decay^i`, scaled so that
`mean_active` features fire per sample on average; a firing feature gets a coefficient from U[0, 1]. In the
correlated variant the firing decisions come from a Gaussian copula: `z ~ N(0, Σ)` with a random correlation
matrix Σ, and feature i fires when `Φ(z_i) < p_i`, so every marginal probability is unchanged.

Everything is a pure function of the config's seed (directions, Σ) and of the generator passed per batch (samples),
so data are bit-reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge.config import SparseFeaturesConfig
from unmerge.data.source import ActivationSource


def firing_probabilities(config: SparseFeaturesConfig) -> Tensor:
    """p_i ∝ decay^i with Σ p_i = mean_active (clipped at 1)."""
    weights = config.decay ** torch.arange(config.n_features, dtype=torch.float64)
    return (weights * config.mean_active / weights.sum()).clamp(max=1.0).float()


def _correlation_factor(config: SparseFeaturesConfig, generator: torch.Generator) -> Tensor:
    """A factor L with L Lᵀ a random correlation matrix (unit diagonal): rows of a random Gaussian matrix,
    normalised, so correlations are cosines of random vectors in `correlation_rank` dimensions."""
    factor = torch.randn(config.n_features, config.correlation_rank, generator=generator)
    return F.normalize(factor, dim=1)


def sparse_feature_source(config: SparseFeaturesConfig) -> ActivationSource:
    """The activation source of a sparse-feature config (directions and correlations fixed by `config.seed`)."""
    generator = torch.Generator().manual_seed(config.seed)
    directions = F.normalize(torch.randn(config.n_features, config.dim, generator=generator), dim=1)
    probabilities = firing_probabilities(config)
    factor = _correlation_factor(config, generator) if config.correlated else None
    normal = torch.distributions.Normal(0.0, 1.0)

    def sample_with_coefficients(batch_size: int, batch_generator: torch.Generator) -> tuple[Tensor, Tensor]:
        device = batch_generator.device
        if factor is None:
            uniform = torch.rand(batch_size, config.n_features, generator=batch_generator, device=device)
        else:
            latent = torch.randn(batch_size, factor.shape[1], generator=batch_generator, device=device)
            uniform = normal.cdf(latent @ factor.T.to(device))
        active = uniform < probabilities.to(device)
        coefficients = torch.rand(batch_size, config.n_features, generator=batch_generator, device=device) * active
        return coefficients @ directions.to(device), coefficients

    return ActivationSource(
        name=f"sparse-features-{config.n_features}-{config.dim}",
        dim=config.dim,
        sample=lambda batch_size, batch_generator: sample_with_coefficients(batch_size, batch_generator)[0],
        true_features=directions,
        sample_with_coefficients=sample_with_coefficients,
    )
