"""Activation cache: a model's activations at one hook point, streamed to disk in safetensors shards.

The token windows are shuffled once (a seeded permutation) and recorded in batches; the kept positions (not BOS or
padding) are buffered and written as shards whose rows are permuted again, so every shard mixes positions of many
sequences and a dictionary can sample from the cache without a shuffle buffer. Each row's token id is stored beside
it. `manifest.json` is rewritten atomically after every shard with the number of sequences done; shards end at batch
boundaries, so an interrupted build resumes exactly where it stopped and writes the same bytes as an uninterrupted
one. Opening a cache checks every shard's size, checksum and header, so a truncated or damaged shard is an error
naming the file, never silent garbage.

The module knows nothing about models: the caller passes `record` (token windows to activations) and `keep` (token
windows to the mask of positions worth storing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from unmerge.data.source import ActivationSource
from unmerge.errors import CheckpointError, UnmergeError
from unmerge.io import sha256_file, write_atomic
from unmerge.train.progress import progress_bar
from unmerge.train.rng import draw_rows, step_generator

MANIFEST_FILE = "manifest.json"
_VERSION = 1
_SHARD_PATTERN = "shard-*.safetensors"
_PARTIAL_SHARD_PATTERN = ".shard-*"  # `write_atomic`'s temporary files, left behind only by a hard kill


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(directory / MANIFEST_FILE, lambda path: path.write_text(text))


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of `directory`, or None when it has none."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); delete {directory} and rebuild the cache") from None
    if manifest.get("version") != _VERSION:
        raise CheckpointError(
            f"{path} has version {manifest.get('version')!r}, this code reads version {_VERSION}; "
            f"delete {directory} and rebuild the cache"
        )
    return manifest


def _build_settings(
    sequences: Tensor, seed: int, shard_tokens: int, batch_sequences: int, dtype: torch.dtype, description: dict | None
) -> dict[str, Any]:
    """What a resumed build must share with the interrupted one for the two to write the same cache."""
    return {
        "dtype": _dtype_name(dtype),
        "n_sequences": sequences.shape[0],
        "seq_len": sequences.shape[1],
        "seed": seed,
        "shard_tokens": shard_tokens,
        "batch_sequences": batch_sequences,
        "description": json.loads(json.dumps(description or {})),  # as it will read back from JSON
        "sequences_sha256": hashlib.sha256(sequences.numpy().data).hexdigest(),
    }


def _checked_sequences(sequences: Tensor, shard_tokens: int, batch_sequences: int) -> Tensor:
    if sequences.dim() != 2 or sequences.shape[0] == 0 or sequences.is_floating_point():
        raise UnmergeError(
            f"sequences must be a non-empty (n_sequences, seq_len) tensor of token ids, got a "
            f"{sequences.dtype} tensor of shape {tuple(sequences.shape)}"
        )
    if shard_tokens < 1 or batch_sequences < 1:
        raise UnmergeError(f"shard_tokens ({shard_tokens}) and batch_sequences ({batch_sequences}) must be positive")
    return sequences.to(device="cpu", dtype=torch.int64).contiguous()


def _start_or_resume(directory: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A fresh manifest for an empty directory, or the existing one if it was built with the same settings, with
    its missing or truncated shards (and every shard after them) dropped so that they are recorded again."""
    manifest = _read_manifest(directory)
    if manifest is None:
        if directory.is_dir() and any(directory.glob(_SHARD_PATTERN)):
            raise CheckpointError(
                f"{directory} holds activation shards but no {MANIFEST_FILE}; choose another directory or delete it"
            )
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"version": _VERSION, "dim": None, **settings, "sequences_done": 0, "complete": False, "shards": []}
        _write_manifest(directory, manifest)
        return manifest
    for key, value in settings.items():
        if manifest.get(key) != value:
            raise CheckpointError(
                f"the activation cache at {directory} was built with a different {key} "
                f"({manifest.get(key)!r} there, {value!r} now); choose another directory or "
                "delete it"
            )
    _drop_damaged_tail(directory, manifest)
    return manifest


def _drop_damaged_tail(directory: Path, manifest: dict[str, Any]) -> None:
    """Cut the shard list at its first missing or wrong-sized shard and delete shard files it does not list
    (leftovers of an interrupted write), so the build goes on from the last intact shard."""
    shards = manifest["shards"]
    intact = next(
        (
            index
            for index, shard in enumerate(shards)
            if not (directory / shard["file"]).is_file() or (directory / shard["file"]).stat().st_size != shard["bytes"]
        ),
        len(shards),
    )
    if intact < len(shards):
        manifest.update(
            shards=shards[:intact], complete=False, sequences_done=shards[intact - 1]["sequences_done"] if intact else 0
        )
    listed = {shard["file"] for shard in manifest["shards"]}
    for leftover in [*directory.glob(_SHARD_PATTERN), *directory.glob(_PARTIAL_SHARD_PATTERN)]:
        if leftover.name not in listed:
            leftover.unlink()


def _kept_rows(
    windows: Tensor,
    record: Callable[[Tensor], Tensor],
    keep: Callable[[Tensor], Tensor],
    dim: int | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(activations in `dtype`, int32 token ids) of the kept positions of a batch of windows, on the CPU."""
    activations = record(windows)
    if activations.dim() != 3 or activations.shape[:2] != windows.shape or dim not in (None, activations.shape[2]):
        expected = f"({windows.shape[0]}, {windows.shape[1]}, {'d' if dim is None else dim})"
        raise UnmergeError(
            f"record returned activations of shape {tuple(activations.shape)}, expected {expected}: "
            "(sequences, positions, d) with the same d for every batch"
        )
    mask = keep(windows)
    if mask.shape != windows.shape or mask.dtype != torch.bool:
        raise UnmergeError(
            f"keep returned a {mask.dtype} mask of shape {tuple(mask.shape)}, expected a bool mask "
            f"of shape {tuple(windows.shape)}"
        )
    kept = activations[mask.to(activations.device)].to(device="cpu", dtype=dtype)
    non_finite = int((~torch.isfinite(kept)).any(dim=1).sum())
    if non_finite:
        raise UnmergeError(
            f"{non_finite} of {kept.shape[0]} kept positions have non-finite activations (NaN or "
            f"infinity as {_dtype_name(dtype)}); check the model and its inputs, or store a wider "
            "dtype"
        )
    return kept, windows[mask.cpu()].to(torch.int32)


def _write_shard(
    directory: Path,
    manifest: dict[str, Any],
    activation_parts: list[Tensor],
    token_parts: list[Tensor],
    sequences_done: int,
) -> None:
    """Drain the buffered parts into the next shard, its rows permuted, then write the manifest that lists it.

    At most two copies of the shard's rows are alive at once (parts and their concatenation, then that and its
    permutation, then the permutation and its serialised bytes)."""
    activations, tokens = torch.cat(activation_parts), torch.cat(token_parts)
    activation_parts.clear()
    token_parts.clear()
    index = len(manifest["shards"])
    permutation = torch.randperm(tokens.shape[0], generator=step_generator(manifest["seed"], "cache-shard", index))
    tensors = {"activations": activations[permutation], "tokens": tokens[permutation]}
    del activations, tokens
    path = directory / _shard_name(index)
    write_atomic(path, lambda temporary: save_file(tensors, str(temporary)))
    manifest["shards"].append(
        {
            "file": path.name,
            "rows": tensors["tokens"].shape[0],
            "sequences_done": sequences_done,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }
    )
    manifest["sequences_done"] = sequences_done
    _write_manifest(directory, manifest)


def _record_shards(
    directory: Path,
    manifest: dict[str, Any],
    sequences: Tensor,
    record: Callable[[Tensor], Tensor],
    keep: Callable[[Tensor], Tensor],
    dtype: torch.dtype,
    progress: bool,
) -> None:
    """Record the sequences not yet done, in the shuffled order, into shards; mark the manifest complete."""
    n_sequences, seq_len = sequences.shape
    batch_sequences, rows_per_shard = manifest["batch_sequences"], manifest["shard_tokens"]
    order = torch.randperm(n_sequences, generator=step_generator(manifest["seed"], "cache-order"))
    activation_parts: list[Tensor] = []
    token_parts: list[Tensor] = []
    buffered = 0
    bar = progress_bar(
        shown=progress,
        total=n_sequences * seq_len,
        initial=manifest["sequences_done"] * seq_len,
        unit="tok",
        unit_scale=True,
        desc="caching activations",
    )
    with bar, torch.no_grad():
        for start in range(manifest["sequences_done"], n_sequences, batch_sequences):
            windows = sequences[order[start : start + batch_sequences]]
            activations, tokens = _kept_rows(windows, record, keep, manifest["dim"], dtype)
            manifest["dim"] = activations.shape[1]
            activation_parts.append(activations)
            token_parts.append(tokens)
            buffered += tokens.shape[0]
            bar.update(windows.numel())
            sequences_done = start + windows.shape[0]
            if buffered >= rows_per_shard or (sequences_done == n_sequences and buffered):
                _write_shard(directory, manifest, activation_parts, token_parts, sequences_done)
                buffered = 0
    manifest.update(sequences_done=n_sequences, complete=True)
    _write_manifest(directory, manifest)


def build_activation_cache(
    directory: Path,
    sequences: Tensor,
    record: Callable[[Tensor], Tensor],
    keep: Callable[[Tensor], Tensor],
    *,
    seed: int = 0,
    shard_tokens: int = 65536,
    batch_sequences: int = 32,
    dtype: torch.dtype = torch.float32,
    description: dict | None = None,
    progress: bool = True,
) -> ActivationCache:
    """Record `record(windows)` at the positions `keep(windows)` marks, for every token window in `sequences`
    (n_sequences, seq_len), into shards of about `shard_tokens` rows under `directory`, and open the result.

    `record` maps CPU int64 windows (b, seq_len) to activations (b, seq_len, d) (it runs under `torch.no_grad()`
    and may move the windows to its model's device); `keep` maps them to a bool mask (b, seq_len). `description`
    (JSON-able provenance: model, hook, corpus) is stored in the manifest. If `directory` holds an interrupted
    build with the same settings, the build resumes; a finished one is just opened; one with other settings raises
    `CheckpointError`.
    """
    directory = Path(directory)
    sequences = _checked_sequences(sequences, shard_tokens, batch_sequences)
    settings = _build_settings(sequences, seed, shard_tokens, batch_sequences, dtype, description)
    manifest = _start_or_resume(directory, settings)
    if not manifest["complete"]:
        _record_shards(directory, manifest, sequences, record, keep, dtype, progress)
    return ActivationCache(directory)


def _shard_error(directory: Path, file: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"shard {file} of the activation cache at {directory} {problem}; delete the shard and "
        f"rerun the build to record it again, or delete {directory} and rebuild"
    )


class ActivationCache:
    """A finished activation cache, every shard checked on opening (presence, byte size, header shapes, and the
    SHA-256 checksum when `verify`), so training never reads a truncated or damaged shard."""

    def __init__(self, directory: Path, verify: bool = True) -> None:
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise CheckpointError(
                f"there is no activation cache at {self.directory} ({MANIFEST_FILE} is missing); "
                "build it with build_activation_cache"
            )
        if not manifest["complete"]:
            raise CheckpointError(
                f"the activation cache at {self.directory} is incomplete: the cache build was "
                "interrupted; rerun the same command to resume it"
            )
        self.dim: int = manifest["dim"]
        self.description: dict = manifest["description"]
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.n_tokens: int = sum(shard["rows"] for shard in self.shards)
        for shard in self.shards:
            self._check_shard(shard, verify)
        self._loaded: tuple[Tensor, Tensor] | None = None

    def _check_shard(self, shard: dict[str, Any], verify: bool) -> None:
        path = self.directory / shard["file"]
        if not path.is_file():
            raise _shard_error(self.directory, shard["file"], "is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise _shard_error(
                self.directory,
                shard["file"],
                f"has {size} bytes instead of {shard['bytes']} (truncated or overwritten)",
            )
        if verify and sha256_file(path) != shard["sha256"]:
            raise _shard_error(self.directory, shard["file"], "fails its SHA-256 checksum (its bytes are damaged)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        except SafetensorError as error:
            raise _shard_error(self.directory, shard["file"], f"cannot be parsed ({error})") from None
        expected = {"activations": [shard["rows"], self.dim], "tokens": [shard["rows"]]}
        if shapes != expected:
            raise _shard_error(self.directory, shard["file"], f"holds tensors {shapes} instead of {expected}")

    def load(self) -> tuple[Tensor, Tensor]:
        """All activations as float32 (n_tokens, dim) and their token ids as int64 (n_tokens,), in shard order;
        read once, then kept in memory."""
        if self._loaded is None:
            activations = torch.empty(self.n_tokens, self.dim)
            tokens = torch.empty(self.n_tokens, dtype=torch.int64)
            offset = 0
            for shard in self.shards:
                tensors = load_file(str(self.directory / shard["file"]))
                activations[offset : offset + shard["rows"]] = tensors["activations"]
                tokens[offset : offset + shard["rows"]] = tensors["tokens"]
                offset += shard["rows"]
            self._loaded = activations, tokens
        return self._loaded

    def source(self, name: str) -> ActivationSource:
        """An `ActivationSource` that samples cached rows uniformly with replacement (a function of the generator)."""
        activations, _ = self.load()
        if activations.shape[0] == 0:
            raise UnmergeError(
                f"the activation cache at {self.directory} holds no rows (keep() kept no position); "
                "rebuild it with a keep mask that keeps some"
            )

        def sample(size: int, generator: torch.Generator) -> Tensor:
            return draw_rows(activations, size, generator)

        return ActivationSource(name=name, dim=self.dim, sample=sample)
