"""Data-parallel training on torch.distributed: starting the process group under torchrun, and the few collectives
the loop and the methods need. Without a process group every helper is the single-process identity.

A step's global batch (`train.batch_size`) is split over the ranks; each rank computes its part's loss, gradients
are averaged (one flat all-reduce), so every rank applies the same update to the same weights. Statistics a method
keeps between steps (dictionary firing counters, BatchTopK's threshold) are reduced too, so ranks never drift.
What a loss takes over the whole batch is taken over the global one: sums over the batch (SPD's frequency and count
terms) are summed over the ranks (`sum_across_ranks`), and the batch top-k rule of APD and BatchTopK
(`top_of_batch`) ranks the ranks' gathered candidates.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from unmerge.config import TrainConfig
from unmerge.errors import ConfigError
from unmerge.io import cache_lock
from unmerge.train.devices import resolve_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 writes files and shows progress."""
    return rank() == 0


@contextmanager
def training_lock(entry: Path) -> Iterator[None]:
    """`cache_lock` on a cache entry that is trained (a toy target, the small LM): processes that need the same
    untrained entry take turns, one trains it and the others wait and load it. The ranks of one torchrun job train
    it together (data-parallel): rank 0 holds the lock for them, and the others wait at a barrier until it has it
    (within the process group's 30-minute timeout) and again until they are all done with the entry."""
    if not is_distributed():
        with cache_lock(entry):
            yield
        return
    with cache_lock(entry) if is_main_process() else nullcontext():
        barrier()
        yield
        barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(train: TrainConfig) -> torch.device:
    """Set the run's torch threads, resolve its device and, when torchrun started several processes, join their
    process group (NCCL on CUDA, gloo on the CPU); idempotent. Returns the device this rank runs on."""
    if train.threads:
        torch.set_num_threads(train.threads)
    device = resolve_device(train.device)
    if launched_by_torchrun() and not is_distributed():
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"data-parallel training runs on cpu or cuda, not {device.type}; set train.device")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return device


def stop() -> None:
    """Leave the process group (if any) after the last collective."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where small reductions run: NCCL reduces on the process's card, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(units: list[nn.Module]) -> None:
    """FSDP2: shard each unit's parameters over the ranks (dim 0); a unit's forward gathers them, and they stay
    gathered until its backward has reduce-scattered their gradients (so tensors a forward returned stay valid)."""
    for unit in units:
        fully_shard(unit, reshard_after_forward=False)


def gather(units: list[nn.Module]) -> None:
    """Gather sharded units for good (a collective): their parameters read as plain tensors afterwards."""
    for unit in units:
        unit.unshard()  # type: ignore[operator]


def full(tensor: Tensor) -> Tensor:
    """A sharded tensor's full value (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: Tensor, reference: Tensor) -> Tensor:
    """A full value laid out like `reference`: this rank's shard when `reference` is sharded (no communication,
    every rank holds the value), else the value on reference's device."""
    if isinstance(reference, DTensor):
        return distribute_tensor(
            value.to(reference.device), reference.device_mesh, reference.placements, src_data_rank=None
        )
    return value.to(reference.device)


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce gradients to their mean across ranks (one flat buffer, one collective); gradients FSDP2 has
    already reduce-scattered are left alone."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) forward and backward: every rank's loss of the sum is the same, so the gradient reaching
    each rank's part is the sum of the ranks' (equal) gradients of the sum."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: FunctionCtx, gradient: Tensor) -> Tensor:  # type: ignore[override]
        summed = gradient.clone()
        dist.all_reduce(summed)
        return summed


def sum_across_ranks(tensor: Tensor) -> Tensor:
    """`tensor` summed over the ranks, differentiably (the tensor itself on one process). A loss of such a global
    sum is the same on every rank; the backward pass sums its gradient over the ranks too, so after
    `average_gradients` each rank holds the gradient one process would get on the whole batch."""
    if not is_distributed():
        return tensor
    return _SumAcrossRanks.apply(tensor)


def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, no gradient (the tensor itself on one
    process): the global batch's rows of a per-example quantity."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def top_of_batch(values: Tensor, per_example: float, across_ranks: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The batch top-k rule shared by APD and BatchTopK. Of this rank's per-example `values` (B, …), those among
    the `round(per_example · B)` largest of the batch (at least one); with `across_ranks`, of the global batch under
    torchrun, as one process would (each rank's own that many largest hold the global ones, so only those are
    gathered, and a value tied with the global last is kept on every rank). Returns the kept values
    (differentiable), their indices in `values.flatten()`, and the batch's largest values (detached, unordered)."""
    batch = len(values) * (world_size() if across_ranks else 1)
    keep = max(1, round(per_example * batch))
    kept, indices = values.flatten().topk(min(keep, values.numel()), sorted=False)
    largest = kept.detach()
    if across_ranks and is_distributed():
        candidates = gather_rows(largest)
        largest = candidates.topk(min(keep, candidates.numel()), sorted=False).values
        chosen = kept >= largest.min()
        kept, indices = kept[chosen], indices[chosen]
    return kept, indices, largest


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics across ranks (every rank must pass the same keys in the same order)."""
    if not is_distributed() or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist(), strict=True))


def mean_tensor(tensor: Tensor) -> Tensor:
    """The elementwise mean of `tensor` over ranks (a new tensor; the input itself when not distributed)."""
    if not is_distributed():
        return tensor
    reduced = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(reduced)
    return (reduced / world_size()).to(tensor.device)


def any_across_ranks(mask: Tensor) -> Tensor:
    """Elementwise OR of a boolean tensor over ranks."""
    if not is_distributed():
        return mask
    reduced = mask.to(_collective_device(), torch.uint8)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(mask.device, torch.bool)
