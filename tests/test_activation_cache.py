"""The activation cache: round trip, masking, shuffling, resume after an interruption, and damaged shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from unmerge.data.activation_cache import MANIFEST_FILE, ActivationCache, build_activation_cache
from unmerge.errors import CheckpointError, UnmergeError
from unmerge.train.rng import step_generator

VOCAB, DIM, N_SEQUENCES, SEQ_LEN = 50, 8, 40, 16
SHARD_TOKENS, BATCH_SEQUENCES = 100, 4
EMBEDDING = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0))


def _sequences(seed: int = 1) -> Tensor:
    """Token windows that start with BOS (id 0) and contain further zeros, as padding would."""
    sequences = torch.randint(0, VOCAB, (N_SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    sequences[:, 0] = 0
    return sequences


def _record(windows: Tensor) -> Tensor:
    """A fake model: each position's activation is its token's fixed embedding."""
    return EMBEDDING[windows]


def _keep(windows: Tensor) -> Tensor:
    return windows != 0


def _build(directory: Path, **overrides: object) -> ActivationCache:
    arguments = {
        "sequences": _sequences(),
        "record": _record,
        "keep": _keep,
        "shard_tokens": SHARD_TOKENS,
        "batch_sequences": BATCH_SEQUENCES,
        "description": {"model": "fake", "hook": "embed"},
        "progress": False,
        **overrides,
    }
    return build_activation_cache(directory, **arguments)  # type: ignore[arg-type]


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())


class _FailingRecord:
    """`_record` that counts its calls and raises on call number `fail_at` (from 1), as an interrupted build would."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, windows: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return _record(windows)


def test_round_trip_stores_each_kept_position_with_its_token(tmp_path: Path) -> None:
    cache = _build(tmp_path / "cache")
    activations, tokens = cache.load()
    sequences = _sequences()
    kept = sequences[sequences != 0]
    assert cache.dim == DIM and cache.n_tokens == kept.numel() == activations.shape[0]
    assert activations.dtype == torch.float32 and tokens.dtype == torch.int64
    assert torch.equal(activations, EMBEDDING[tokens])
    assert torch.equal(tokens.sort().values, kept.sort().values)
    assert (tokens != 0).all()
    assert cache.description == {"model": "fake", "hook": "embed"}
    assert cache.load() is cache.load()


def test_half_precision_rows_are_stored_rounded(tmp_path: Path) -> None:
    cache = _build(tmp_path / "cache", dtype=torch.float16)
    activations, tokens = cache.load()
    assert activations.dtype == torch.float32
    assert torch.equal(activations, EMBEDDING[tokens].half().float())


def test_shards_end_at_batch_boundaries_and_stay_near_their_size(tmp_path: Path) -> None:
    cache = _build(tmp_path / "cache")
    shards = _manifest(tmp_path / "cache")["shards"]
    rows = [shard["rows"] for shard in shards]
    assert len(rows) > 3 and sum(rows) == cache.n_tokens
    assert all(SHARD_TOKENS <= count <= SHARD_TOKENS + BATCH_SEQUENCES * SEQ_LEN for count in rows[:-1])
    assert 0 < rows[-1] <= SHARD_TOKENS + BATCH_SEQUENCES * SEQ_LEN
    assert all(shard["sequences_done"] % BATCH_SEQUENCES == 0 for shard in shards[:-1])
    assert shards[-1]["sequences_done"] == N_SEQUENCES


def test_same_seed_gives_identical_files_and_another_seed_another_order(tmp_path: Path) -> None:
    first, again, other = (_build(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    first_activations, first_tokens = first.load()
    other_activations, other_tokens = other.load()
    assert not torch.equal(first_tokens, other_tokens)
    assert torch.equal(first_tokens.sort().values, other_tokens.sort().values)
    assert torch.equal(other_activations, EMBEDDING[other_tokens])
    assert torch.equal(first_activations, again.load()[0])


def test_first_shard_mixes_the_positions_of_the_first_shuffled_sequences(tmp_path: Path) -> None:
    cache = _build(tmp_path / "cache")
    first_shard = _manifest(tmp_path / "cache")["shards"][0]
    order = torch.randperm(N_SEQUENCES, generator=step_generator(0, "cache-order"))
    first_sequences = _sequences()[order[: first_shard["sequences_done"]]]
    in_sequence_order = first_sequences[first_sequences != 0]
    stored = cache.load()[1][: first_shard["rows"]]
    assert not torch.equal(stored, in_sequence_order)
    assert torch.equal(stored.sort().values, in_sequence_order.sort().values)


def test_interrupted_build_resumes_to_identical_files(tmp_path: Path) -> None:
    _build(tmp_path / "whole")
    interrupted = _FailingRecord(fail_at=7)
    with pytest.raises(RuntimeError, match="interrupted"):
        _build(tmp_path / "resumed", record=interrupted)
    manifest = _manifest(tmp_path / "resumed")
    assert not manifest["complete"] and 0 < manifest["sequences_done"] < N_SEQUENCES
    with pytest.raises(CheckpointError, match="interrupted; rerun the same command"):
        ActivationCache(tmp_path / "resumed")
    for leftover in (
        f"shard-{len(manifest['shards']):05d}.safetensors",
        "shard-00099.safetensors",
        f".shard-{len(manifest['shards']):05d}.safetensors.partial",
    ):
        (tmp_path / "resumed" / leftover).write_bytes(b"half a shard")
    resumed = _FailingRecord()
    _build(tmp_path / "resumed", record=resumed)
    assert resumed.calls == (N_SEQUENCES - manifest["sequences_done"]) // BATCH_SEQUENCES
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    finished = _FailingRecord()
    _build(tmp_path / "resumed", record=finished)
    assert finished.calls == 0


def test_truncated_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    _build(tmp_path / "cache")
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="shard-00001.safetensors.*truncated"):
            ActivationCache(tmp_path / "cache", verify=verify)


def test_damaged_shard_fails_its_checksum_and_a_deleted_shard_is_rebuilt(tmp_path: Path) -> None:
    _build(tmp_path / "cache")
    original = _files(tmp_path / "cache")
    shard = tmp_path / "cache" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard-00002.safetensors .*fails its SHA-256 checksum"):
        ActivationCache(tmp_path / "cache")
    assert ActivationCache(tmp_path / "cache", verify=False).n_tokens > 0
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard-00002.safetensors .*is missing"):
        ActivationCache(tmp_path / "cache")
    _build(tmp_path / "cache")
    assert _files(tmp_path / "cache") == original


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"seed": 3}, "seed"),
        ({"description": {"model": "other"}}, "description"),
        ({"sequences": _sequences(seed=2)}, "sequences_sha256"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_resuming_with_other_settings_is_refused(tmp_path: Path, override: dict, setting: str) -> None:
    _build(tmp_path / "cache")
    with pytest.raises(CheckpointError, match=f"different {setting}.*choose another directory or delete it"):
        _build(tmp_path / "cache", **override)


def test_source_samples_cached_rows_deterministically(tmp_path: Path) -> None:
    source = _build(tmp_path / "cache").source("fake-embed")
    first = source.sample(64, torch.Generator().manual_seed(5))
    again = source.sample(64, torch.Generator().manual_seed(5))
    other = source.sample(64, torch.Generator().manual_seed(6))
    assert source.name == "fake-embed" and source.dim == DIM and first.shape == (64, DIM)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first[:, None, :] == EMBEDDING[None, 1:]).all(dim=-1).any(dim=-1).all()


def test_bad_record_output_is_explained(tmp_path: Path) -> None:
    with pytest.raises(UnmergeError, match=rf"shape \(4, 16\), expected \(4, {SEQ_LEN}, d\)"):
        _build(tmp_path / "flat", record=lambda windows: EMBEDDING[windows].sum(-1))
    calls: list[Tensor] = []

    def narrowing(windows: Tensor) -> Tensor:
        calls.append(windows)
        return _record(windows)[..., : DIM if len(calls) == 1 else DIM - 1]

    with pytest.raises(UnmergeError, match=rf"shape \(4, {SEQ_LEN}, {DIM - 1}\), expected \(4, {SEQ_LEN}, {DIM}\)"):
        _build(tmp_path / "narrowing", record=narrowing)
    with pytest.raises(UnmergeError, match="expected a bool mask"):
        _build(tmp_path / "mask", keep=lambda windows: windows)


def test_non_finite_activations_are_counted(tmp_path: Path) -> None:
    poisoned = EMBEDDING.clone()
    poisoned[1:10] = float("nan")
    order = torch.randperm(N_SEQUENCES, generator=step_generator(0, "cache-order"))
    first_batch = _sequences()[order[:BATCH_SEQUENCES]]
    n_poisoned, n_kept = int(((first_batch > 0) & (first_batch < 10)).sum()), int((first_batch != 0).sum())
    assert n_poisoned > 0
    with pytest.raises(UnmergeError, match=f"{n_poisoned} of {n_kept} kept positions have non-finite activations"):
        _build(tmp_path / "cache", record=lambda windows: poisoned[windows])


def test_missing_cache_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no activation cache"):
        ActivationCache(tmp_path / "nothing")
