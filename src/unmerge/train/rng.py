"""Counter-based seeding: every (seed, stream, rank, step) gets its own generator.

A run therefore needs no RNG state in its checkpoints: step t draws the same data and masks whether the run was
interrupted or not, and each rank of a data-parallel run draws different data.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(seed: int, stream: str, step: int = 0, rank: int = 0) -> int:
    """A 63-bit seed unique to (seed, stream, step, rank)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(
    seed: int, stream: str, step: int = 0, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on `device` seeded for one stream ('data', 'noise', 'init', ...) at one step on one rank.

    Code that draws from it creates its tensors on `generator.device`, so a step's random numbers are made where
    the step runs. The same seed on the same device gives the same numbers; CPU and CUDA streams differ."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, step, rank))


def draw_rows(table: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """`size` rows of `table` drawn uniformly with replacement, on the generator's device (the table may stay on
    the CPU: only the drawn rows move)."""
    index = torch.randint(table.shape[0], (size,), generator=generator, device=generator.device)
    return table[index.to(table.device)].to(generator.device)
