"""Streaming an activation cache through a bounded shuffle buffer: every row once per epoch, steps that are pure
functions of their arguments, rank slices, the in-memory sampler's draws, shard reads, and bounded peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from unmerge.config import TrainConfig
from unmerge.data.activation_cache import ActivationCache, build_activation_cache
from unmerge.data.cache_stream import StreamedCache
from unmerge.errors import UnmergeError
from unmerge.train.loop import ModelTraining, train

DIM, N_SEQUENCES, SEQ_LEN = 4, 30, 16
SHARD_TOKENS, BATCH_SEQUENCES, BUFFER_SHARDS = 50, 2, 3


def _record(windows: Tensor) -> Tensor:
    """A fake model whose activation at a position is (token id + 0, + 1, ...): each row names its token."""
    return windows.unsqueeze(-1).float() + torch.arange(DIM)


def _keep(windows: Tensor) -> Tensor:
    return windows % 5 != 0


def _build(
    directory: Path, dtype: torch.dtype = torch.float32, keep: Callable[[Tensor], Tensor] = _keep
) -> ActivationCache:
    sequences = torch.arange(N_SEQUENCES * SEQ_LEN).reshape(N_SEQUENCES, SEQ_LEN)  # every token id is unique
    return build_activation_cache(
        directory,
        sequences,
        _record,
        keep,
        shard_tokens=SHARD_TOKENS,
        batch_sequences=BATCH_SEQUENCES,
        dtype=dtype,
        progress=False,
    )


@pytest.fixture(scope="module", params=[torch.float32, torch.float16], ids=["float32", "float16"])
def cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ActivationCache:
    return _build(tmp_path_factory.mktemp("cache"), request.param)


def _ids(rows: Tensor) -> Tensor:
    """The token ids the rows were recorded from, after checking each row is intact."""
    ids = rows[:, 0].long()
    assert rows.dtype == torch.float32 and torch.equal(rows, _record(ids[None])[0])
    return ids


def _stream(stream: StreamedCache, steps: range, global_size: int, world: int) -> Tensor:
    """Token ids of the global stream over `steps`, the ranks' parts concatenated."""
    return torch.cat([_ids(stream.part(t, global_size, r, world)) for t in steps for r in range(world)])


def _shard_of_id(cache: ActivationCache) -> dict[int, int]:
    _, tokens = cache.load()
    shard = torch.repeat_interleave(torch.arange(len(cache.shards)), torch.tensor([s["rows"] for s in cache.shards]))
    return dict(zip(tokens.tolist(), shard.tolist(), strict=True))


def _spy_reads(stream: StreamedCache, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The shard indices `stream` reads, in order."""
    reads: list[int] = []
    read = stream._read_shard

    def spy(index: int) -> Tensor:
        reads.append(index)
        return read(index)

    monkeypatch.setattr(stream, "_read_shard", spy)
    return reads


@pytest.mark.parametrize("world", [1, 2])
def test_every_row_is_seen_once_per_epoch(cache: ActivationCache, world: int) -> None:
    n, global_size = cache.n_tokens, 36  # batches straddle windows and epochs
    stream = StreamedCache(cache, seed=3, buffer_shards=BUFFER_SHARDS)
    ids = _stream(stream, range(-(-2 * n // global_size)), global_size, world)
    every = cache.load()[1].sort().values
    assert len(cache.shards) > 2 * BUFFER_SHARDS and n % global_size
    assert torch.equal(ids[:n].sort().values, every) and torch.equal(ids[n : 2 * n].sort().values, every)
    assert not torch.equal(ids[:n], ids[n : 2 * n])  # each epoch has its own order
    # the shuffle buffer is bounded: the first window mixes the rows of exactly `buffer_shards` shards
    shard_of = _shard_of_id(cache)
    first_window = {shard_of[i] for i in ids[: BUFFER_SHARDS * SHARD_TOKENS].tolist()}
    assert len(first_window) == BUFFER_SHARDS


def test_part_is_a_pure_function_of_its_arguments(cache: ActivationCache) -> None:
    steps, global_size = list(range(25)), 40
    in_order = StreamedCache(cache, seed=5, buffer_shards=2)
    expected = {t: in_order.part(t, global_size, 1, 2) for t in steps}
    shuffled = [steps[i] for i in torch.randperm(len(steps), generator=torch.Generator().manual_seed(0))]
    for stream in (StreamedCache(cache, seed=5, buffer_shards=2), in_order):  # fresh, and with a window loaded
        for t in shuffled:
            assert torch.equal(stream.part(t, global_size, 1, 2), expected[t])
    other = StreamedCache(cache, seed=6, buffer_shards=2).part(0, global_size, 1, 2)
    assert not torch.equal(other, expected[0])


def test_rank_slices_concatenate_to_the_single_rank_batch(cache: ActivationCache) -> None:
    one, two = StreamedCache(cache, seed=1, buffer_shards=2), StreamedCache(cache, seed=1, buffer_shards=2)
    for step in [0, 1, 7, 4, 19, 20]:  # 384 rows, batches of 42 cross an epoch at step 9
        halves = [two.part(step, 42, rank, 2) for rank in range(2)]
        assert halves[0].shape == (21, DIM)
        assert torch.equal(torch.cat(halves), one.part(step, 42, 0, 1))


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_uniform_samples_equal_the_in_memory_sampler(cache: ActivationCache, size: int) -> None:
    stream = StreamedCache(cache, seed=0, buffer_shards=1)
    activations = cache.load()[0]
    sample = cache.source("cached").sample
    for seed in range(3):
        drawn = stream(size, torch.Generator().manual_seed(seed))
        index = torch.randint(cache.n_tokens, (size,), generator=torch.Generator().manual_seed(seed))
        assert drawn.dtype == torch.float32 and torch.equal(drawn, activations[index])
        assert torch.equal(drawn, sample(size, torch.Generator().manual_seed(seed)))


def test_reads_only_the_shards_holding_the_rows_and_each_once_per_window(
    cache: ActivationCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard_of = _shard_of_id(cache)
    for step, rank in [(0, 0), (3, 2), (11, 3)]:  # two rows per rank: a few of the window's shards
        stream = StreamedCache(cache, seed=2, buffer_shards=4)
        reads = _spy_reads(stream, monkeypatch)
        ids = _ids(stream.part(step, 8, rank, 4))
        assert sorted(reads) == sorted({shard_of[i] for i in ids.tolist()})
    stream = StreamedCache(cache, seed=2, buffer_shards=BUFFER_SHARDS)
    reads = _spy_reads(stream, monkeypatch)
    _stream(stream, range(cache.n_tokens // 32), 32, 1)  # exactly one epoch
    assert sorted(reads) == list(range(len(cache.shards)))
    reads.clear()
    ids = _ids(stream(20, torch.Generator().manual_seed(4)))
    assert sorted(reads) == sorted({shard_of[i] for i in ids.tolist()})


def test_errors_name_the_problem(tmp_path: Path) -> None:
    empty = _build(tmp_path / "empty", keep=lambda windows: torch.zeros_like(windows, dtype=torch.bool))
    with pytest.raises(UnmergeError, match="holds no rows"):
        StreamedCache(empty, seed=0, buffer_shards=2)
    cache = _build(tmp_path / "cache")
    with pytest.raises(UnmergeError, match="buffer_shards"):
        StreamedCache(cache, seed=0, buffer_shards=0)
    stream = StreamedCache(cache, seed=0, buffer_shards=2)
    with pytest.raises(UnmergeError, match=r"global batch size \(10\).*world=3"):
        stream.part(0, 10, 0, 3)
    with pytest.raises(UnmergeError, match="rank"):
        stream.part(0, 10, 2, 2)


_WRITE = """
import sys, torch
from pathlib import Path
from unmerge.data.activation_cache import build_activation_cache
rows, seq_len, dim = {rows}, 64, 512
sequences = torch.arange(rows).reshape(-1, seq_len)
build_activation_cache(Path(sys.argv[1]), sequences, lambda w: w.unsqueeze(-1).float().expand(-1, -1, dim),
                       lambda w: torch.ones_like(w, dtype=torch.bool), shard_tokens=2048, progress=False)
"""

_READ = r"""
import json, re, sys, torch
from pathlib import Path
from unmerge.data.activation_cache import ActivationCache
from unmerge.data.cache_stream import StreamedCache
def peak_rss():  # VmHWM: ru_maxrss would carry the parent's peak over through fork and exec
    return int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
stream = StreamedCache(ActivationCache(Path(sys.argv[1]), verify=False), seed=0, buffer_shards=2)
before = peak_rss()
n, global_size = stream.n_tokens, 1024
seen = torch.zeros(n, dtype=torch.int64)
for step in range(n // global_size):
    rows = stream.part(step, global_size, 0, 1)
    seen += torch.bincount(rows[:, 0].long(), minlength=n)
    del rows
print(json.dumps({"before": before, "after": peak_rss(), "once": bool((seen == 1).all())}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux)")
def test_streaming_an_epoch_holds_about_buffer_shards_shards_in_memory(tmp_path: Path) -> None:
    # one thread: on a busy machine, OpenMP threads spinning against each other make each small op slow
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    directory = tmp_path / "big"
    rows = 96 * 1024  # 192 MiB of float32 rows of 512 in 48 shards of 4 MiB
    subprocess.run([sys.executable, "-c", _WRITE.format(rows=rows), str(directory)], check=True, env=env)
    on_disk = sum(path.stat().st_size for path in directory.glob("shard-*.safetensors"))
    assert on_disk > 190 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", _READ, str(directory)], check=True, env=env, capture_output=True, text=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth = report["after"] - report["before"]
    print(f"peak RSS growth {growth / 2**20:.1f} MiB while streaming a {on_disk / 2**20:.0f} MiB cache")
    assert report["once"]
    assert on_disk / 48 < growth < on_disk / 4  # at least a shard (a measurement that saw nothing would be wrong)


def test_the_training_loop_reads_a_streamed_cache_once_per_epoch(tmp_path: Path) -> None:
    """The one training loop asks a streamed cache for each step's part, so training visits every row once."""
    cache = _build(tmp_path / "cache")
    stream = StreamedCache(cache, seed=0, buffer_shards=BUFFER_SHARDS)
    seen: list[Tensor] = []

    def loss(model: torch.nn.Module, batch: Tensor) -> Tensor:
        seen.append(_ids(batch))
        return model(batch).square().mean()

    batch_size = 20
    steps = cache.n_tokens // batch_size
    train(ModelTraining(torch.nn.Linear(DIM, 1), loss), stream, TrainConfig(steps=steps, batch_size=batch_size))
    ids = torch.cat(seen)
    assert ids.numel() == steps * batch_size and ids.unique().numel() == ids.numel()
