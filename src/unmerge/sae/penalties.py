"""Sparsity penalties on latent activations f ≥ 0, each the negative log of a prior on a latent's value.

Every penalty is summed over latents and averaged over examples: it is NOT divided by the dictionary width, so with
a fixed number of true features a wider dictionary pays more for spreading them out, not less. With
`decoder_norms` given, each latent counts as `f_i ‖d_i‖`, which makes the penalty invariant to moving scale
between a latent and its decoder row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from unmerge.config import PenaltyConfig
from unmerge.errors import ConfigError


def l1(f: Tensor) -> Tensor:
    """|f|: the Laplace prior. Convex, so optimisation is easy; it shrinks every active coefficient."""
    return f.abs()


def lp(f: Tensor, p: float, epsilon: float) -> Tensor:
    """(|f| + ε)^p − ε^p, p < 1: a generalised-normal prior heavier-tailed than Laplace, closer to L0 as p → 0.
    Plain |f|^p has an infinite gradient at 0 (p|f|^(p−1)); ε caps it at p ε^(p−1)."""
    return (f.abs() + epsilon).pow(p) - epsilon**p


def cauchy(f: Tensor, sigma: float) -> Tensor:
    """log(1 + f²/σ²): the Cauchy (Student-t with one degree of freedom) prior of scale σ."""
    return torch.log1p((f / sigma).square())


def log1p_abs(f: Tensor) -> Tensor:
    """log(1 + |f|): the improper prior ∝ 1/(1 + |f|), a log-sparsity penalty that barely shrinks large values."""
    return torch.log1p(f.abs())


def tanh(f: Tensor, scale: float) -> Tensor:
    """tanh(c |f|): a saturating, bounded approximation of L0 (no proper prior; c sets where it saturates)."""
    return torch.tanh(scale * f.abs())


def penalty_exponent(config: PenaltyConfig, progress: float) -> float:
    """p of the Lp penalty at `progress` ∈ [0, 1] of training: annealed linearly to `p_final` if set."""
    if config.p_final is None:
        return config.p
    return config.p + (config.p_final - config.p) * min(max(progress, 0.0), 1.0)


def elementwise_penalty(config: PenaltyConfig, progress: float = 0.0) -> Callable[[Tensor], Tensor]:
    """The per-latent penalty function named by `config`."""
    name = config.name
    if name == "l1":
        return l1
    if name == "lp":
        p = penalty_exponent(config, progress)
        return lambda f: lp(f, p, config.epsilon)
    if name == "cauchy":
        return lambda f: cauchy(f, config.sigma)
    if name == "log1p":
        return log1p_abs
    if name == "tanh":
        return lambda f: tanh(f, config.scale)
    if name == "none":
        return torch.zeros_like
    raise ConfigError(f"unknown penalty {name!r}; choose one of l1, lp, cauchy, log1p, tanh, none")


def sparsity_penalty(
    f: Tensor, config: PenaltyConfig, decoder_norms: Tensor | None = None, progress: float = 0.0
) -> Tensor:
    """`mean_b Σ_i ρ(f_bi ‖d_i‖)` (or `ρ(f_bi)` without decoder weighting), unscaled by λ."""
    if config.decoder_norm_weighted:
        if decoder_norms is None:
            raise ValueError("decoder_norm_weighted penalty needs the decoder row norms")
        f = f * decoder_norms
    return elementwise_penalty(config, progress)(f).sum(-1).mean()
