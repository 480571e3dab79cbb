"""Stream an activation cache larger than memory: shards pass through a bounded shuffle buffer.

The global stream runs epoch after epoch over the cache's `n_tokens` rows. Epoch e visits the shards in a seeded
permutation, grouped into windows of `buffer_shards` consecutive shards, and a window's rows are shuffled by a
permutation seeded by (seed, e, window): that is the shuffle buffer, so every row is seen exactly once per epoch while
only one window is ever held in memory. Step t's global batch is stream positions [t * global_size,
(t + 1) * global_size), and a rank takes its contiguous slice of it, so a step's rows are a pure function of
(step, global_size, rank, world) and a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from unmerge.data.activation_cache import ActivationCache
from unmerge.errors import UnmergeError
from unmerge.train.rng import step_generator


@dataclass
class _Window:
    """The shuffle buffer of one (epoch, window): its shards, their row ends, its row permutation, and the shards
    read so far (only those holding rows asked for)."""

    key: tuple[int, int]
    shards: list[int]
    ends: Tensor
    order: Tensor
    loaded: dict[int, Tensor] = field(default_factory=dict)


def _gather(rows: Tensor, ends: Tensor, read: Callable[[int], Tensor], out: Tensor) -> Tensor:
    """Write rows `rows` of the concatenation of shards whose cumulative row ends are `ends` into `out`, in the order
    asked, reading each shard that holds any of them with `read(its position)`, one shard at a time."""
    positions = torch.searchsorted(ends, rows, right=True)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    for position in positions.unique().tolist():
        chosen = positions == position
        out[chosen] = read(position)[rows[chosen] - starts[position]]
    return out


class StreamedCache:
    """An `ActivationCache` read shard by shard: `part` for the training stream, `__call__` for uniform samples."""

    def __init__(self, cache: ActivationCache, seed: int, buffer_shards: int) -> None:
        if cache.n_tokens == 0:
            raise UnmergeError(
                f"the activation cache at {cache.directory} holds no rows (keep() kept no position); "
                "rebuild it with a keep mask that keeps some"
            )
        if buffer_shards < 1:
            raise UnmergeError(f"buffer_shards must be at least 1, got {buffer_shards}")
        self.directory: Path = Path(cache.directory)
        self.dim: int = cache.dim
        self.n_tokens: int = cache.n_tokens
        self.seed = seed
        self.buffer_shards = buffer_shards
        self._files: list[str] = [shard["file"] for shard in cache.shards]
        self._rows: list[int] = [shard["rows"] for shard in cache.shards]
        self._ends = torch.tensor(self._rows, dtype=torch.int64).cumsum(0)
        self._epoch: tuple[int, list[list[int]], list[int]] | None = None
        self._window: _Window | None = None

    def _read_shard(self, index: int) -> Tensor:
        """One shard's activations as float32 (rows, dim)."""
        with safe_open(str(self.directory / self._files[index]), framework="pt") as handle:
            return handle.get_tensor("activations").float()

    def _layout(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The windows of `epoch` (lists of shard indices) and their start positions in the epoch (plus its end)."""
        if self._epoch is None or self._epoch[0] != epoch:
            generator = step_generator(self.seed, "cache-stream-epoch", epoch)
            order = torch.randperm(len(self._files), generator=generator).tolist()
            windows = [order[i : i + self.buffer_shards] for i in range(0, len(order), self.buffer_shards)]
            starts = [0]
            for window in windows:
                starts.append(starts[-1] + sum(self._rows[shard] for shard in window))
            self._epoch = (epoch, windows, starts)
        return self._epoch[1], self._epoch[2]

    def _enter(self, epoch: int, index: int, shards: list[int]) -> _Window:
        """The buffer of window `index` of `epoch`; entering a new window drops the previous one's rows."""
        if self._window is None or self._window.key != (epoch, index):
            self._window = None  # free the old window before the new one is read
            ends = torch.tensor([self._rows[shard] for shard in shards], dtype=torch.int64).cumsum(0)
            generator = step_generator(self.seed, "cache-stream-window", epoch, index)
            self._window = _Window((epoch, index), shards, ends, torch.randperm(int(ends[-1]), generator=generator))
        return self._window

    def _window_rows(self, window: _Window, start: int, out: Tensor) -> Tensor:
        """Buffer positions [start, start + len(out)) of `window` into `out`, reading only the shards holding them."""

        def read(position: int) -> Tensor:
            shard = window.shards[position]
            if shard not in window.loaded:
                window.loaded[shard] = self._read_shard(shard)
            return window.loaded[shard]

        return _gather(window.order[start : start + out.shape[0]], window.ends, read, out)

    def part(self, step: int, global_size: int, rank: int, world: int) -> Tensor:
        """The float32 rows (global_size // world, dim) that `rank` of `world` trains on at `step`: its contiguous
        slice of stream positions [step * global_size, (step + 1) * global_size)."""
        if step < 0 or global_size < 1 or world < 1 or not 0 <= rank < world:
            raise UnmergeError(
                f"part needs step >= 0, global_size >= 1 and 0 <= rank < world, got step={step}, "
                f"global_size={global_size}, rank={rank}, world={world}"
            )
        if global_size % world:
            raise UnmergeError(
                f"the global batch size ({global_size}) must be divisible by the number of ranks (world={world})"
            )
        size = global_size // world
        first = step * global_size + rank * size
        out = torch.empty(size, self.dim)
        done = 0
        while done < size:
            position = first + done
            epoch, offset = divmod(position, self.n_tokens)
            windows, starts = self._layout(epoch)
            index = bisect_right(starts, offset) - 1
            count = min(size - done, starts[index + 1] - offset)
            window = self._enter(epoch, index, windows[index])
            self._window_rows(window, offset - starts[index], out[done : done + count])
            done += count
        return out

    def __call__(self, size: int, generator: torch.Generator) -> Tensor:
        """`size` rows drawn uniformly with replacement, exactly as the in-memory sampler draws them (the same
        indices from `generator`), reading one shard at a time and only the shards holding drawn rows."""
        index = torch.randint(self.n_tokens, (size,), generator=generator, device=generator.device)
        out = torch.empty(size, self.dim)
        return _gather(index.cpu(), self._ends, self._read_shard, out).to(generator.device)
