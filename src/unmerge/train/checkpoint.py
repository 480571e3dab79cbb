"""Atomic checkpoints: `checkpoints/step-NNNNNNN/{weights.safetensors, state.json}`.

A checkpoint is written into a temporary directory and renamed into place, so a directory with a final name is
always complete; `state.json` records the SHA-256 of the weights, so a damaged file is detected on load rather
than silently trained on. Optimiser state is flattened into the same safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from unmerge.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
_OPTIMIZER_PREFIX = "optimizer."


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomic(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, fsync, and rename onto `path`; readers see the old or the new file, never half.
    The file gets the permissions an ordinary new file would (the umask applied), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_process_umask())
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Flatten an optimiser's per-parameter state into `optimizer.{index}.{name}` tensors."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{_OPTIMIZER_PREFIX}{index}.{name}"] = torch.as_tensor(value).clone()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Inverse of `optimizer_tensors` (hyperparameters come from the current optimiser)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key[len(_OPTIMIZER_PREFIX) :].split(".", 1)
        state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep`."""
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        weights = staging / WEIGHTS_FILE
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(weights))
        with weights.open("rb") as handle:
            os.fsync(handle.fileno())
        full_state = {**state, "step": step, "weights_sha256": sha256_file(weights)}
        (staging / STATE_FILE).write_text(json.dumps(full_state, indent=2))
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint, verifying its checksum; a damaged one raises `CheckpointError` naming the file."""
    weights, state_file = path / WEIGHTS_FILE, path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has an unreadable {STATE_FILE} ({error}); delete {path} to "
                              "resume from the previous checkpoint") from None
    if not weights.is_file() or sha256_file(weights) != state.get("weights_sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt ({WEIGHTS_FILE} is missing or fails its checksum); "
                              f"delete {path} to resume from the previous checkpoint")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error}); delete it to resume from the previous one") from None
    return tensors, state


def split_optimizer(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate model tensors from flattened optimiser state."""
    model = {k: v for k, v in tensors.items() if not k.startswith(_OPTIMIZER_PREFIX)}
    optim = {k: v for k, v in tensors.items() if k.startswith(_OPTIMIZER_PREFIX)}
    return model, optim
