"""SPD's loss terms, each one small function used by training and evaluation alike (DESIGN.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge.kernels.cpu.ci import counter_uniform_reference, fused_kernel_serves, fused_stochastic_masks
from unmerge.train import distributed


def faithfulness_loss(target_weights: list[Tensor], reconstructions: list[Tensor]) -> Tensor:
    """`(1/N) Σ_l ‖W^l − U^l V^l‖²_F`, N the number of decomposed weight entries."""
    squared = sum(((w - r) ** 2).sum() for w, r in zip(target_weights, reconstructions, strict=True))
    n_entries = sum(w.numel() for w in target_weights)
    return squared / n_entries


SUB_UNIT_P_OFFSET = 1e-12


def annealed_pnorm(start: float, final: float | None, begin: float, end: float, progress: float) -> float:
    """p of the importance penalty at `progress` (the fraction of training done): `start` until `begin`, then
    linearly to `final` at `end`, and `final` after it; `start` throughout when `final` is None."""
    if final is None:
        return start
    moved = min(max((progress - begin) / (end - begin), 0.0), 1.0)
    return start + (final - start) * moved


def importance_powers(upper_importance: Tensor, pnorm: float) -> Tensor:
    """`g⁺^p`, elementwise. Below p = 1 the slope `p g^(p−1)` is infinite at g = 0, where σ_upper's is 0 (0 · ∞ is
    NaN), so g is offset by `SUB_UNIT_P_OFFSET` there: finite everywhere, the values unchanged to 1e-12^p."""
    if pnorm == 1:
        return upper_importance
    return upper_importance.pow(pnorm) if pnorm > 1 else (upper_importance + SUB_UNIT_P_OFFSET).pow(pnorm)


def importance_minimality_loss(powers: list[Tensor]) -> Tensor:
    """`(1/B) Σ_b Σ_l Σ_c |g⁺_{b,l,c}|^p` from each site's `g⁺^p` (`importance_powers`); B counts every leading
    position (examples × tokens).

    g⁺ = σ_upper(γ) is never negative, so |g⁺| = g⁺ and no absolute value is taken."""
    n_positions = powers[0][..., 0].numel()
    return sum(powered.sum() for powered in powers) / n_positions


def _batch_sums(powered: Tensor) -> tuple[Tensor, int]:
    """Per subcomponent, the sum of `g⁺^p` over the global batch's positions (every rank's under torchrun), and
    the number of those positions (the ranks' parts are equal)."""
    rows = powered.reshape(-1, powered.shape[-1])
    return distributed.sum_across_ranks(rows.sum(0)), rows.shape[0] * distributed.world_size()


def importance_frequency_loss(powers: list[Tensor]) -> Tensor:
    """`Σ_c m_c log2(1 + S_c)` over every subcomponent c of every site, with m_c the mean and S_c the sum over the
    batch's positions of `g⁺_c^p` (each site's `importance_powers`; VPD's frequency minimality): one subcomponent
    important on many inputs costs more than two that share those inputs between them, so subcomponents that serve
    several features split. The batch is the global one under torchrun, as on one process."""
    total = powers[0].new_zeros(())
    for powered in powers:
        sums, positions = _batch_sums(powered)
        total = total + (sums / positions * torch.log2(1 + sums)).sum()
    return total


def importance_count_loss(powers: list[Tensor]) -> Tensor:
    """`Σ_c log2(1 + S_c)` over every subcomponent c of every site, with S_c the sum over the batch's positions of
    `g⁺_c^p`: a smooth count of the subcomponents in use. Its slope `1 / ((1 + S_c) ln 2)` is steepest for a
    subcomponent that is rarely important, so where the loss is otherwise indifferent between a dense mechanism
    and that mechanism plus a rarely used remnant, the remnant dies (the importance penalty alone charges it in
    proportion to its rare use: next to nothing). The batch is the global one under torchrun, as on one process."""
    total = powers[0].new_zeros(())
    for powered in powers:
        total = total + torch.log2(1 + _batch_sums(powered)[0]).sum()
    return total


def output_divergence(prediction: Tensor, target: Tensor, kind: str) -> Tensor:
    """D(target ‖ prediction): MSE over output elements for toys; KL(target ‖ prediction) per position for LMs."""
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "kl":
        log_p = F.log_softmax(target, dim=-1)
        log_q = F.log_softmax(prediction, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    raise ValueError(f"unknown output divergence {kind!r}")


def stochastic_masks(lower_importance: Tensor, generator: torch.Generator, c_kernel: bool) -> Tensor:
    """`m = g + (1 − g) r`, `r ~ U[0, 1)` per position and subcomponent; gradient flows through g.

    r comes from a counter-based hash keyed by two words drawn from `generator`: with `c_kernel` the C kernel
    computes it in the same pass as the mask (and recomputes it for the gradient); torch draws the same r."""
    k0, k1 = (int(k) for k in torch.randint(0, 2**32, (2,), generator=generator, device=generator.device).tolist())
    if c_kernel and fused_kernel_serves(lower_importance):
        return fused_stochastic_masks(lower_importance, (k0, k1))
    r = counter_uniform_reference(lower_importance.shape, (k0, k1), lower_importance.device)
    r = r.to(lower_importance.dtype)
    return lower_importance + (1 - lower_importance) * r
