"""Sparse feature data with known ground truth (Sharkey, Braun & Millidge 2022; DESIGN.md §6).

`n_features` unit-norm Gaussian directions in R^d; feature i fires with probability ∝ `decay^i`, scaled so that
`mean_active` features fire per sample on average; a firing feature gets a coefficient from U[0, 1]. In the
correlated variant the firing decisions come from a Gaussian copula: `z ~ N(0, Σ)` with a random correlation
matrix Σ, and feature i fires when `Φ(z_i) < p_i`, so every marginal probability is unchanged.

Everything is a pure function of the config's seed (directions, Σ) and of the generator passed per batch (samples),
so data are bit-reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge.config import SparseFeaturesConfig

Reconstruct = Callable[[Tensor], tuple[Tensor, Tensor]]  # activations (n, d) → (reconstruction, latents)


@dataclass(frozen=True)
class LatentExamples:
    """Latent activations (or any unit's: SPD's causal importances) on held-out text, for showing top-activating
    snippets: the windows' token texts,
    `activations` (windows, seq, width) with 0 at special tokens, `top` (k, width): each latent's k most
    activating positions as flat indices into windows × seq, strongest first, and which positions are ordinary."""

    tokens: list[list[str]]
    activations: Tensor
    top: Tensor
    ordinary: Tensor  # (windows, seq) bool: the positions that hold ordinary tokens
    ablation_effect: Tensor | None = None  # (width,): first-order rise of the spliced loss with the latent zeroed
    effect_name: str = "ΔCE"  # what ablation_effect measures, for the report's column
    names: list[str] | None = None  # a label per unit (SPD's `site/c`); None: the latent's index
    threshold: float = 0.0  # a unit counts as active above this (0 for latents, e.g. 0.1 for causal importance)


@dataclass(frozen=True)
class ActivationSource:
    """What a dictionary trains on: a batch sampler of d-dimensional activations and, for toys, the true features
    (rows of `true_features`, unit norm, in the space the decoder writes to), their coefficients' generator for
    shrinkage measurements and, for the hierarchy toy, each feature's parent index (−1: none).

    A transcoder's source has an `output_dim`: each sampled row is a block's input followed by its output,
    `(batch, dim + output_dim)`, so pairs stay together through the one training loop (`split`).

    A language model's source has a `spliced_evaluation`: given the dictionary's `x ↦ (x̂, latents)`, it splices
    the dictionary into the model on held-out text and returns its metrics (`unmerge.data.language_activations`);
    and `latent_examples`: given `x ↦ (x̂, latents)`, the decoder's atoms and k, each latent's k most activating
    held-out snippets and its estimated ablation effect."""

    name: str
    dim: int
    sample: Callable[[int, torch.Generator], Tensor]
    true_features: Tensor | None = None
    sample_with_coefficients: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] | None = None
    parents: Tensor | None = None
    output_dim: int | None = None
    spliced_evaluation: Callable[[Callable[[Tensor], tuple[Tensor, Tensor]]], dict[str, float]] | None = None
    latent_examples: Callable[[Reconstruct, Tensor, int], LatentExamples] | None = None

    @property
    def row_width(self) -> int:
        """Columns of a sampled batch: the input's, plus the output's for a transcoder source."""
        return self.dim + (self.output_dim or 0)

    def split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, reconstruction targets) of a sampled batch: a transcoder's (input, output), else (x, x)."""
        if self.output_dim is None:
            return batch, batch
        return batch[:, :self.dim], batch[:, self.dim:]


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
        if factor is None:
            uniform = torch.rand(batch_size, config.n_features, generator=batch_generator)
        else:
            latent = torch.randn(batch_size, factor.shape[1], generator=batch_generator) @ factor.T
            uniform = normal.cdf(latent)
        active = uniform < probabilities
        coefficients = torch.rand(batch_size, config.n_features, generator=batch_generator) * active
        return coefficients @ directions, coefficients

    return ActivationSource(
        name=f"sparse-features-{config.n_features}-{config.dim}",
        dim=config.dim,
        sample=lambda batch_size, batch_generator: sample_with_coefficients(batch_size, batch_generator)[0],
        true_features=directions,
        sample_with_coefficients=sample_with_coefficients,
    )
