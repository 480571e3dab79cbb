"""How well subcomponents recover the ground-truth feature directions of a weight (MMCS, ML2R)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Recovery:
    """Per-feature best subcomponent and the three scores, each averaged over features.

    * `mmcs`: `mean_i max_c cos(row_i(U_c V_cᵀ), row_i(W))` (rows indexed by feature).
    * `ml2r`: `mean_i ‖row_i of the best c‖ / ‖row_i(W)‖` (1 is perfect; < 1 is shrinkage).
    * `matrix_cosine`: cosine between the feature's whole rank-1 matrix in W and the best subcomponent's matrix;
      strict: it also penalises a subcomponent that reads other features.
    """

    mmcs: float
    ml2r: float
    matrix_cosine: float
    best: Tensor


MIN_CARRIED_SHARE = 0.01


def feature_recovery(weight: Tensor, U: Tensor, V: Tensor, axis: str, rank: int = 1) -> Recovery:
    """Score the components of `weight` (d_out × d_in) against its per-feature rows: component c is
    `Σ_r U[:, c·rank + r] V[c·rank + r, :]`, the subcomponents rank-1 (SPD) or grouped `rank` at a time (an APD
    component of that rank at one site).

    `axis="in"`: features index the input columns (feature i's row is `weight[:, i]`); `"out"`: the output rows.

    Feature i's best component is the one whose row i is closest in direction among those whose row carries at
    least `MIN_CARRIED_SHARE` of ‖row_i(W)‖ (any component when none does): a component serving feature j leaves
    a vanishing row for j's antipodal partner i (TMS lays features out in antipodal pairs) whose direction can
    match w_i to 1e-6, and would otherwise be taken as i's with a norm ratio near 0.
    """
    if axis == "out":
        return feature_recovery(weight.T, V.T, U.T, "in", rank)
    if axis != "in":
        raise ValueError(f"axis must be 'in' or 'out', not {axis!r}")
    weight, U, V = weight.detach().double(), U.detach().double(), V.detach().double()
    feature_rows = weight.T  # (n, d_out)
    n, d_out, C = feature_rows.shape[0], feature_rows.shape[1], U.shape[1] // rank
    U_pieces, V_pieces = U.reshape(d_out, C, rank), V.reshape(C, rank, n)
    if rank == 1:  # row i of subcomponent c, (n, C, d_out)
        candidate_rows = V.T[:, :, None] * U.T[None, :, :]
    else:
        candidate_rows = (V_pieces.permute(2, 0, 1)[..., None] * U_pieces.permute(1, 2, 0)[None]).sum(2)
    cosines = F.cosine_similarity(candidate_rows, feature_rows[:, None, :], dim=-1)
    feature_norm = feature_rows.norm(dim=-1)
    ratios = candidate_rows.norm(dim=-1) / feature_norm[:, None]
    carrying = ratios >= MIN_CARRIED_SHARE  # the direction of a vanishing row is noise, not a match
    best = torch.where(carrying, cosines, cosines - 3).argmax(dim=1)
    arange = torch.arange(len(best))
    best_cos, ratio = cosines[arange, best], ratios[arange, best]
    if rank == 1:  # the rank-1 closed forms: ⟨U_c V_c, w_i e_iᵀ⟩ = V_ci (U_c · w_i), ‖U_c V_c‖_F = ‖U_c‖ ‖V_c‖
        inner = V[best, arange] * (U[:, best] * feature_rows.T).sum(0)
        denominator = feature_norm * U[:, best].norm(dim=0) * V[best].norm(dim=-1)
    else:
        inner = (candidate_rows[arange, best] * feature_rows).sum(-1)
        gram = torch.einsum("ocr,ocs->crs", U_pieces, U_pieces) * torch.einsum("crn,csn->crs", V_pieces, V_pieces)
        denominator = feature_norm * gram.sum((1, 2)).sqrt()[best]
    matrix_cos = inner / denominator
    return Recovery(
        mmcs=float(best_cos.mean()), ml2r=float(ratio.mean()), matrix_cosine=float(matrix_cos.mean()), best=best
    )
