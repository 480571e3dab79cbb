"""Counter-based seeding: every (seed, stream, rank, step) gets its own generator.

A run therefore needs no RNG state in its checkpoints: step t draws the same data and masks whether the run was
interrupted or not, and each rank of a data-parallel run draws different data.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stream: str, step: int = 0, rank: int = 0) -> int:
    """A 63-bit seed unique to (seed, stream, step, rank)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, stream: str, step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded for one stream ('data', 'noise', 'init', ...) at one step on one rank."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, step, rank))
