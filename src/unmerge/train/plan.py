"""What a run will cost before it starts (`--dry-run`): the learned parameters, and an estimate of the memory one
training step needs on each device, itemised so a user can see what to shrink.

The estimate counts fp32 weights, gradients and Adam's two moments for every learned parameter, the frozen
target's weights, the activations a step keeps for its backward pass (the method gives their count per batch
row; bf16 halves those autocast computes in bf16), and the largest working buffer a step builds and frees, such
as SPD's per-subcomponent CI blocks. It is an estimate, not a measurement: allocator slack comes on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unmerge.config import TrainConfig
from unmerge.errors import ConfigError
from unmerge.train import distributed

FP32 = 4
TRAINING_COPIES = 4  # weights, gradients, Adam's first and second moments


@dataclass
class StepPlan:
    """A run's parts (name → learned parameters, shape), its frozen parameters, and the activation values one
    batch row keeps for the backward pass."""

    title: str
    rows_per_example: int
    parts: list[tuple[str, int, str]] = field(default_factory=list)
    frozen_parameters: int = 0
    frozen_bytes_each: int = FP32  # 2 for a target stored in bf16
    activations_per_row: int = 0
    working_name: str = ""  # a buffer a step builds and frees (fp32): values per row, at most `working_cap` values
    working_per_row: int = 0
    working_cap: int = 0

    @property
    def learned_parameters(self) -> int:
        return sum(count for _, count, _ in self.parts)

    def memory(self, train: TrainConfig, world: int | None = None) -> dict[str, int]:
        """Bytes per device: learned state, frozen weights, activations of one step's share of the batch."""
        world = world or distributed.world_size()
        rows = train.batch_size // world * self.rows_per_example
        activation_bytes = FP32 // 2 if train.precision == "bf16" else FP32
        memory = {
            "learned (weights, grads, Adam)": self.learned_parameters * FP32 * TRAINING_COPIES,
            "frozen target weights": self.frozen_parameters * self.frozen_bytes_each,
            f"activations ({rows:,} rows)": rows * self.activations_per_row * activation_bytes,
        }
        if self.working_name:
            memory[self.working_name] = min(rows * self.working_per_row, self.working_cap) * FP32
        return memory

    def render(self, train: TrainConfig, world: int | None = None) -> str:
        lines = [self.title, ""]
        width = max((len(name) for name, _, _ in self.parts), default=0)
        lines += [f"  {name:<{width}}  {count:>12,}  {shape}" for name, count, shape in self.parts]
        lines += [f"  {'total learned':<{width}}  {self.learned_parameters:>12,}", ""]
        memory = self.memory(train, world)
        world = world or distributed.world_size()
        lines.append(
            f"memory per device, estimated ({world} process(es), global batch {train.batch_size}, "
            f"{train.precision}, device {train.device}):"
        )
        lines += [f"  {name:<34} {_size(size):>10}" for name, size in memory.items()]
        lines.append(f"  {'total':<34} {_size(sum(memory.values())):>10}")
        return "\n".join(lines)

    def check_fits(self, train: TrainConfig, device: torch.device) -> None:
        """Refuse, before anything is allocated, a run whose estimate (at the larger of the training and the
        evaluation batch) exceeds the device's whole memory, naming what to shrink."""
        largest = train.model_copy(update={"batch_size": max(train.batch_size, train.eval_batch_size)})
        memory = self.memory(largest)
        need, have = sum(memory.values()), device_memory(device)
        if have is not None and need > have:
            biggest = max(memory, key=memory.__getitem__)
            raise ConfigError(
                f"out of memory: this run needs about {_size(need)} of memory on {device} (mostly {biggest}: "
                f"{_size(memory[biggest])}), "
                f"which has {_size(have)}; lower train.batch_size / train.eval_batch_size, the sites' C or the "
                "dictionary's width (`--dry-run` itemises the estimate)"
            )


def device_memory(device: torch.device) -> int | None:
    """Bytes a device can hold: a card's memory, or the CPU's RAM and swap (Linux); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        sizes = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(sizes[key].split()[0]) * 1024 for key in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
