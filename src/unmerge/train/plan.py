"""What a run will cost before it starts (`--dry-run`): the learned parameters, and an estimate of the memory one
training step needs on each device, itemised so a user can see what to shrink.

The estimate counts fp32 weights, gradients and Adam's two moments for every learned parameter, the frozen
target's weights, the activations a step keeps for its backward pass (the method gives their count per batch
row; bf16 halves those autocast computes in bf16), and the largest working buffer a step builds and frees, such
as SPD's per-subcomponent CI blocks. It is an estimate, not a measurement: allocator slack comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unmerge.config import TrainConfig
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


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
