"""The absorption toy (Chanin et al. 2024): orthonormal features where a child only fires with its parent.

Features are ordered parents, then children (child j of parent i at `n_parents + i·children_per_parent + j`), then
independent features. A parent fires with `parent_probability`; given that, with `child_probability` exactly one of
its children (chosen uniformly) fires too; independent features fire on their own. An L1-trained dictionary can
save sparsity by folding the parent's direction into each child's latent, so the parent latent goes silent exactly
when a child fires: that is absorption, and `metrics.dictionary.parent_recall`/`absorption` measure it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unmerge.config import HierarchyConfig
from unmerge.data.source import ActivationSource


def parent_indices(config: HierarchyConfig) -> Tensor:
    """Each feature's parent index, −1 for parents and independent features."""
    parents = torch.full((config.n_features,), -1, dtype=torch.int64)
    children = torch.arange(config.n_parents).repeat_interleave(config.children_per_parent)
    parents[config.n_parents : config.n_parents + children.numel()] = children
    return parents


def hierarchy_source(config: HierarchyConfig) -> ActivationSource:
    """The activation source of a hierarchy config (random orthonormal directions fixed by `config.seed`)."""
    n, n_parents, n_children = config.n_features, config.n_parents, config.children_per_parent
    gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
    directions = torch.linalg.qr(gaussian).Q.float()

    def sample_with_coefficients(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        on = {"generator": generator, "device": generator.device}
        parent = torch.rand(batch_size, n_parents, **on) < config.parent_probability
        with_child = parent & (torch.rand(batch_size, n_parents, **on) < config.child_probability)
        which = torch.randint(n_children, (batch_size, n_parents, 1), **on)
        child = with_child[..., None] & (torch.arange(n_children, device=generator.device) == which)
        independent = torch.rand(batch_size, config.n_independent, **on) < config.independent_probability
        active = torch.cat([parent, child.flatten(1), independent], dim=1)
        spread = config.magnitude_spread
        magnitudes = 1 - spread + 2 * spread * torch.rand(batch_size, n, **on)
        coefficients = magnitudes * active
        return coefficients @ directions.to(generator.device), coefficients

    return ActivationSource(
        name=f"hierarchy-{n_parents}x{n_children}+{config.n_independent}",
        dim=n,
        sample=lambda batch_size, generator: sample_with_coefficients(batch_size, generator)[0],
        true_features=directions,
        sample_with_coefficients=sample_with_coefficients,
        parents=parent_indices(config),
    )
