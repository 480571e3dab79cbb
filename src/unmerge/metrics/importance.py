"""Metrics on causal importances: CI-L0, alive subcomponents, and CI pattern errors on one-hot inputs."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

L0_THRESHOLDS = (0.01, 0.1, 0.5)


def ci_l0(importance: Tensor, threshold: float = 0.1) -> float:
    """Mean number of subcomponents per position with CI above `threshold`; `importance` is (..., C)."""
    return float((importance > threshold).sum(-1).float().mean())


def alive_count(importance: Tensor, threshold: float = 0.1) -> int:
    """Subcomponents whose CI exceeds `threshold` on at least one position."""
    return int((importance.reshape(-1, importance.shape[-1]) > threshold).any(0).sum())


def identity_matching(importance: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(features, columns) matched one to one by the Hungarian algorithm, maximising the matched CI; with fewer
    columns than features, only as many features are matched."""
    return linear_sum_assignment(importance.detach().cpu().double().numpy(), maximize=True)


def identity_permutation(importance: Tensor) -> np.ndarray:
    """Column matched to each feature (row), in the order of the features (`identity_matching`)."""
    rows, cols = identity_matching(importance)
    return cols[np.argsort(rows)]


def identity_pattern_errors(importance: Tensor, tolerance: float = 0.1) -> int:
    """Entries of a (features × C) one-hot CI matrix that differ by more than `tolerance` from the ideal pattern:
    each feature's matched column 1 on its own row and 0 elsewhere, every unmatched column 0. With fewer columns
    than features, each feature left without a column is one more error (its 1 has nowhere to be)."""
    rows, cols = identity_matching(importance)
    ideal = torch.zeros_like(importance)
    ideal[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    unmatched = importance.shape[0] - len(rows)
    return int(((importance - ideal).abs() > tolerance).sum()) + unmatched


def dense_pattern_errors(importance: Tensor, rank: int, tolerance: float = 0.1) -> int:
    """Columns of a (features × C) one-hot CI matrix off the dense pattern: the `rank` columns with the largest
    mean CI should be ≈ 1 on every input (co-active), all others ≈ 0."""
    order = importance.mean(0).argsort(descending=True)
    active, rest = importance[:, order[:rank]], importance[:, order[rank:]]
    bad_active = ((1 - active).abs() > tolerance).any(0).sum()
    bad_rest = (rest.abs() > tolerance).any(0).sum()
    return int(bad_active + bad_rest)
