"""Description length of a network on a dataset under a decomposition, in bits per input (DESIGN.md §7, §8).

An input is described by naming which of the decomposition's units are active on it and giving their values at a
stated precision. With the units grouped (each group named as a whole: SPD components, or one group per unit),

    L = Σ_groups s_i (log2 k + α r_i)   bits per input,

k groups, s_i the fraction of inputs on which any unit of group i is active, r_i the units in it, α the bits per
unit value. Each active group costs log2 k bits to name (a fixed-length code over the groups) and α bits per
member. For singleton groups it is `E[L0] · (log2 K + α)` with K units. The same formula scores an SPD
decomposition (units: subcomponents with CI above a threshold, across all sites) and a dictionary (units:
latents that fire), so the two are comparable on the same model — beside the reconstruction quality each
achieves, which the formula does not include.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def description_length(frequency: Tensor, sizes: Tensor, alpha: float) -> float:
    """`Σ s_i (log2 k + α r_i)` bits per input for k groups with activation frequencies s and sizes r."""
    k = frequency.shape[0]
    return float((frequency * (math.log2(k) + alpha * sizes)).sum()) if k else 0.0


def activity_description_length(active: Tensor, alpha: float, groups: Tensor | None = None) -> float:
    """Bits per input of the units' activity `active` (inputs, units) bool, each unit its own group or grouped by
    the integer labels `groups` (units,); groups never active cost nothing."""
    index = torch.arange(active.shape[1]) if groups is None else torch.unique(groups, return_inverse=True)[1]
    membership = torch.nn.functional.one_hot(index).float()
    frequency = ((active.float() @ membership) > 0).float().mean(0)
    used = frequency > 0
    return description_length(frequency[used], membership.sum(0)[used], alpha)
