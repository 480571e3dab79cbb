"""Rank awareness: the loop asks these helpers, so torch data-parallel training needs no restructuring.

Without an initialised process group every helper is the single-process identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 writes files and shows progress."""
    return rank() == 0


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce gradients to their mean across ranks (one flat buffer, one collective)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics across ranks (every rank must pass the same keys in the same order)."""
    if not is_distributed() or not values:
        return values
    stacked: Tensor = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist(), strict=True))
