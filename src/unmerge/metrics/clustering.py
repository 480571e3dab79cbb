"""Agreement of two groupings of the same items: the adjusted Rand index (Hubert & Arabie 1985).

`ARI = (Σ_ij C(n_ij, 2) − E) / (½(Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) − E)` with `E = Σ_i C(a_i, 2) Σ_j C(b_j, 2) /
C(n, 2)`, n_ij the contingency table of the two labelings and a_i, b_j its row and column sums: 1 for identical
groupings (up to renaming), about 0 for independent ones. When both groupings put every item alone, or every
item together, the index is 1 (they agree and nothing is left to chance).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pairs(counts: Tensor) -> Tensor:
    return (counts * (counts - 1) / 2).sum()


def adjusted_rand_index(labels_a: Tensor, labels_b: Tensor) -> float:
    """ARI of two integer labelings of the same items (any label values)."""
    if labels_a.shape != labels_b.shape or labels_a.dim() != 1:
        raise ValueError(
            f"two 1-D labelings of equal length are needed, got {tuple(labels_a.shape)} and {tuple(labels_b.shape)}"
        )
    if labels_a.shape[0] < 2:
        return 1.0
    a = torch.unique(labels_a, return_inverse=True)[1]
    b = torch.unique(labels_b, return_inverse=True)[1]
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    index = _pairs(table)
    rows, columns = _pairs(table.sum(1)), _pairs(table.sum(0))
    expected = rows * columns / _pairs(torch.tensor(float(a.shape[0])))
    maximum = (rows + columns) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))
