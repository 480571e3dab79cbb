"""Scores of a dictionary: reconstruction (FVU, cosine, norm ratio), sparsity (L0, dead latents), and recovery of
known features (MMCS both ways, Hungarian-matched MCC, matched counts, duplicates, shrinkage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MATCH_THRESHOLDS = (0.9, 0.99)
DUPLICATE_COSINE = 0.95


def fvu(x: Tensor, reconstruction: Tensor) -> float:
    """Fraction of variance unexplained: `Σ‖x − x̂‖² / Σ‖x − mean(x)‖²` (the mean predictor scores exactly 1)."""
    residual = (x - reconstruction).double().square().sum()
    variance = (x - x.mean(0)).double().square().sum()
    return float(residual / variance)


def reconstruction_cosine(x: Tensor, reconstruction: Tensor) -> float:
    """Mean cosine between each input and its reconstruction."""
    return float(F.cosine_similarity(x.double(), reconstruction.double(), dim=-1).mean())


def norm_ratio(x: Tensor, reconstruction: Tensor) -> float:
    """Mean ‖x̂‖ / mean ‖x‖ (< 1: the reconstruction is shrunk)."""
    return float(reconstruction.double().norm(dim=-1).mean() / x.double().norm(dim=-1).mean())


def l0(latents: Tensor) -> float:
    """Mean number of non-zero latents per example."""
    return float((latents != 0).double().sum(-1).mean())


def cosine_matrix(true_features: Tensor, atoms: Tensor) -> Tensor:
    """(n_true × m) cosines between true feature directions and decoder atoms."""
    return F.normalize(true_features.double(), dim=1) @ F.normalize(atoms.double(), dim=1).T


def recall_mmcs(cosines: Tensor) -> float:
    """Mean over true features of the best cosine with any atom: is every feature found?"""
    return float(cosines.max(1).values.mean())


def precision_mmcs(cosines: Tensor) -> float:
    """Mean over atoms of the best cosine with any true feature: is every atom a true feature?"""
    return float(cosines.max(0).values.mean())


def matched_fraction(cosines: Tensor, threshold: float) -> float:
    """Fraction of true features whose best atom has cosine above `threshold`."""
    return float((cosines.max(1).values > threshold).double().mean())


def hungarian_mcc(cosines: Tensor) -> float:
    """Mean cosine of the best one-to-one matching of true features to atoms (each atom used at most once),
    averaged over true features: unlike MMCS, one atom cannot explain several features."""
    rows, cols = linear_sum_assignment(cosines.cpu().numpy(), maximize=True)
    total = cosines[torch.as_tensor(rows), torch.as_tensor(cols)].sum()
    return float(total / cosines.shape[0])


def _near_copies(atoms: Tensor, threshold: float) -> Tensor:
    """(m × m) mask of distinct atom pairs with cosine above `threshold`."""
    unit = F.normalize(atoms.double(), dim=1)
    return (unit @ unit.T > threshold).fill_diagonal_(False)


def duplicate_latents(atoms: Tensor, threshold: float = DUPLICATE_COSINE) -> int:
    """Atoms that have a near-copy (cosine above `threshold`) among the other atoms (counted once each)."""
    return int(_near_copies(atoms, threshold).any(1).sum())


def later_duplicates(atoms: Tensor, threshold: float = DUPLICATE_COSINE) -> Tensor:
    """Mask of atoms that nearly copy (cosine above `threshold`) an atom with a lower index: freeing these keeps
    exactly one atom of every group of copies."""
    return _near_copies(atoms, threshold).tril(-1).any(1)


def atom_alignment(residual: Tensor, latents: Tensor, atoms: Tensor) -> Tensor:
    """Per latent j: how well its atom points where its firings go, the f²-weighted mean over inputs it fires on
    of the cosine between d_j and `r + f_j d_j` (the residual with j's own contribution put back, i.e. what j is
    asked to explain). About 1 for an atom on one feature; low for an atom between features, which fires on each
    but explains neither. 0 for a latent that never fires in the sample. Needs no ground truth."""
    norms = atoms.norm(dim=1)
    contribution = latents * norms  # f_j ‖d_j‖ (latents ≥ 0)
    along = residual @ (atoms / norms.clamp(min=1e-12)[:, None]).T  # r · d̂_j
    scale = residual.square().sum(1, keepdim=True) + contribution.square()
    explained = scale + 2 * contribution * along  # ‖r + f_j d_j‖², from norms and one product
    resolvable = explained > 1e-6 * scale  # below that, rounding decides the sign: call it unexplained (0)
    cosine = torch.where(resolvable, (along + contribution) / explained.clamp(min=1e-30).sqrt(), 0.0)
    weights = latents.square()
    return (cosine * weights).sum(0) / weights.sum(0).clamp(min=1e-24)


def shrinkage(true_coefficients: Tensor, latents: Tensor, cosines: Tensor, atom_norms: Tensor) -> float:
    """Mean ratio of recovered to true coefficient over active (feature, example) pairs, where each true feature
    is read from its best-matching atom: `f_atom ‖d_atom‖ cos / c_true`. 1 is unbiased; < 1 is shrinkage."""
    best = cosines.max(1)
    recovered = latents[:, best.indices].double() * (atom_norms[best.indices].double() * best.values)
    active = true_coefficients > 0
    if not bool(active.any()):
        return float("nan")
    return float((recovered[active] / true_coefficients[active].double()).mean())


def _best_latent_fires(latents: Tensor, cosines: Tensor) -> Tensor:
    """(examples × true features): whether each feature's best-matching latent fires."""
    return latents[:, cosines.max(1).indices] != 0


def parent_recall(true_coefficients: Tensor, latents: Tensor, cosines: Tensor, parents: Tensor) -> float:
    """Hierarchy toy: mean over parent features of P(the parent's best-matching latent fires | the parent fires)."""
    fires = _best_latent_fires(latents, cosines)
    rates = [fires[true_coefficients[:, g] > 0, g].double().mean() for g in parents.unique().tolist() if g >= 0]
    return float(torch.stack(rates).mean())


def absorption(true_coefficients: Tensor, latents: Tensor, cosines: Tensor, parents: Tensor) -> float:
    """Hierarchy toy: over samples where a child fires (so its parent fires too), the fraction in which the
    parent's best-matching latent is silent while the child's latent fires: the child latent has absorbed the
    parent. Averaged over parents; 0 is no absorption."""
    fires = _best_latent_fires(latents, cosines)
    children = (parents >= 0).nonzero().squeeze(1)
    child_on = true_coefficients[:, children] > 0
    absorbed = fires[:, children] & ~fires[:, parents[children]]
    per_parent = []
    for g in parents[children].unique():
        mine = parents[children] == g
        on = child_on[:, mine]
        per_parent.append(absorbed[:, mine][on].double().mean() if bool(on.any()) else torch.tensor(0.0))
    return float(torch.stack(per_parent).mean())


def latent_purity(latents: Tensor, labels: Tensor, n_labels: int) -> tuple[Tensor, Tensor]:
    """Per latent, the largest share of its activation mass that falls on inputs of one label (1: it fires for
    that label only) and that label; NaN and −1 for latents that never fire. `latents` (inputs, width) ≥ 0 and
    integer `labels` (inputs,) in [0, n_labels)."""
    mass = torch.zeros(n_labels, latents.shape[1], dtype=torch.float64).index_add_(0, labels, latents.double())
    total = mass.sum(0)
    share, label = mass.max(0)
    fires = total > 0
    return torch.where(fires, share / total.clamp(min=1e-300), torch.nan), torch.where(fires, label, -1)
