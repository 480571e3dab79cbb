"""Atomic checkpoints: `checkpoints/step-NNNNNNN/{weights.safetensors, state.json}`.

A checkpoint is written into a temporary directory and renamed into place, so a directory with a final name is
always complete; `state.json` records the SHA-256 of the weights, so a damaged file is detected on load rather
than silently trained on. Optimiser state is flattened into the same safetensors file, keyed by parameter name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unmerge.errors import CheckpointError, warn
from unmerge.io import fsync_dir, sha256_file
from unmerge.runs import CHECKPOINT_DIR, STAGING_PREFIX, saved_steps
from unmerge.train import distributed

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
_OPTIMIZER_PREFIX = "optimizer."
FORMAT = 2  # optimiser state keyed by parameter name (format 1, before it, keyed it by position)


def _trained_names(module: nn.Module) -> list[str]:
    """Names of the parameters the loop's optimiser holds, in its order (those that need gradients)."""
    return [name for name, parameter in module.named_parameters() if parameter.requires_grad]


def checkpoint_tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The module's state and the optimiser's per-parameter state, as `optimizer.{parameter name}.{state}`; FSDP2
    shards are gathered to their full values (a collective: every rank calls this), so any run can resume it."""
    names = _trained_names(module)
    tensors = {name: distributed.full(value) for name, value in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{_OPTIMIZER_PREFIX}{names[index]}.{key}"] = distributed.full(torch.as_tensor(value)).clone()
    return tensors


def _upgrade_format_1(
    module: nn.Module, model: dict[str, Tensor], optim: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A format-1 checkpoint (optimiser state by position) in format 2. A module whose parameters were renamed or
    reordered since says how with `legacy_names()`: (old name, new name) in the old optimiser's order."""
    legacy = getattr(module, "legacy_names", None)
    pairs = legacy() if legacy is not None else [(name, name) for name in _trained_names(module)]
    renamed = dict(pairs)
    model = {renamed.get(key, key): value for key, value in model.items()}
    upgraded = {}
    for key, value in optim.items():
        index, state = key[len(_OPTIMIZER_PREFIX) :].split(".", 1)
        if int(index) >= len(pairs):
            raise CheckpointError(
                f"the checkpoint holds optimiser state for parameter {index}, but the model has "
                f"{len(pairs)}: it belongs to another model"
            )
        upgraded[f"{_OPTIMIZER_PREFIX}{pairs[int(index)][1]}.{state}"] = value
    return model, upgraded


def restore(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint into `module` (and `optimizer`'s state, its hyperparameters kept); returns the saved
    training state. A checkpoint that does not fit is a `CheckpointError` naming it."""
    tensors, state = load_checkpoint(path)
    model, optim = split_optimizer(tensors)
    if state.get("format", 1) < FORMAT:
        model, optim = _upgrade_format_1(module, model, optim)
    current = module.state_dict()
    model = {
        name: distributed.like(value, current[name]) if name in current else value for name, value in model.items()
    }
    try:
        module.load_state_dict(model, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit this run's model: {error}") from None
    if optimizer is not None:
        index = {name: i for i, name in enumerate(_trained_names(module))}
        per_parameter: dict[int, dict[str, Tensor]] = {}
        for key, value in optim.items():
            name, state_key = key[len(_OPTIMIZER_PREFIX) :].rsplit(".", 1)
            if name not in index:
                raise CheckpointError(
                    f"checkpoint {path} holds optimiser state for {name!r}, which this run's "
                    "model does not train; it belongs to another model"
                )
            if state_key != "step":  # moments are laid out like their parameter (sharded under FSDP2)
                value = distributed.like(value, current[name])
            per_parameter.setdefault(index[name], {})[state_key] = value
        optimizer.load_state_dict({"state": per_parameter, "param_groups": optimizer.state_dict()["param_groups"]})
    return state


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep`."""
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING_PREFIX))
    try:
        weights = staging / WEIGHTS_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(weights))
        with weights.open("rb") as handle:
            os.fsync(handle.fileno())
        full_state = {**state, "step": step, "format": FORMAT, "weights_sha256": sha256_file(weights)}
        (staging / STATE_FILE).write_text(json.dumps(full_state, indent=2))
        fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    for old in saved_steps(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `state.json`: a JSON object whose step is the one its folder is named after, with the
    weights' checksum; anything else is a `CheckpointError` naming the file."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has an unreadable {STATE_FILE} ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} holds {type(state).__name__}, not an object")
    missing = [key for key, kind in (("step", int), ("weights_sha256", str)) if not isinstance(state.get(key), kind)]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks a valid {' and '.join(missing)}")
    if path.name != f"step-{state['step']:07d}":
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} says step {state['step']}, its folder another")
    return state


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint, verifying its state and checksum; a damaged one raises `CheckpointError` naming it."""
    state = _read_state(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file() or sha256_file(weights) != state["weights_sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt ({WEIGHTS_FILE} is missing or fails its checksum)")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error})") from None
    return tensors, state


def restore_newest(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore the newest checkpoint that loads (`restore`); a corrupt newer one is skipped with a warning naming
    it (it is never loaded, and the next save at its step replaces it). The training state, or {} with none
    saved; every checkpoint corrupt is an error saying how to start over."""
    saved = saved_steps(run_dir)
    for path in reversed(saved):
        try:
            state = restore(path, module, optimizer)
        except CheckpointError as error:
            warn(f"skipping a damaged checkpoint: {error}")
            continue
        return state
    if saved:
        raise CheckpointError(
            f"every checkpoint of {run_dir} is damaged (see the warnings); delete {run_dir / CHECKPOINT_DIR} "
            "to train from the start, or choose another --out directory"
        )
    return {}


def split_optimizer(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate model tensors from flattened optimiser state."""
    model = {k: v for k, v in tensors.items() if not k.startswith(_OPTIMIZER_PREFIX)}
    optim = {k: v for k, v in tensors.items() if k.startswith(_OPTIMIZER_PREFIX)}
    return model, optim
