"""Toy targets with ground truth: build, train (through the one training loop), save, load, cache.

A trained target is stored as `model.safetensors` + `target.yaml` (its full config, recipe included) and reused:
`cached_target` keys the cache by the config's digest, so a changed recipe trains a new target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from unmerge.config import (
    InductionConfig,
    MaxOfKConfig,
    ModularAdditionConfig,
    ResidMLPConfig,
    StrictModel,
    TargetConfig,
    TMSConfig,
    load_yaml,
    save_yaml,
    validate,
)
from unmerge.errors import CheckpointError
from unmerge.io import cache_root, save_tensors_atomic, write_atomic, write_json_atomic
from unmerge.targets import algorithmic, induction, resid_mlp, tms
from unmerge.targets.base import GroundTruth, Target
from unmerge.train import distributed
from unmerge.train.loop import ModelTraining, train
from unmerge.train.rng import derive_seed

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "target.yaml"
TASK_METRICS_FILE = "task_metrics.json"  # the trained model's score on its task (algorithmic toys)


@dataclass(frozen=True)
class ToyRecipe:
    """How to build one kind of toy target, sample its inputs, train it, state its ground truth (if it has one
    in this form) and score the trained model on its task."""

    build: Callable[[TargetConfig], nn.Module]
    inputs: Callable[[TargetConfig, int, torch.Generator], Tensor]
    loss: Callable[[nn.Module, Tensor], Tensor]
    ground_truth: Callable[[TargetConfig], GroundTruth | None] = lambda config: None
    task_metrics: Callable[[nn.Module, TargetConfig], dict[str, float]] | None = None


RECIPES: dict[str, ToyRecipe] = {
    "tms": ToyRecipe(tms.TMSModel, tms.tms_inputs, tms.tms_loss, tms.tms_ground_truth),
    "resid_mlp": ToyRecipe(
        lambda c: resid_mlp.ResidMLP(c, embedding_seed=derive_seed(c.train.seed, "embedding")),
        resid_mlp.resid_mlp_inputs,
        resid_mlp.resid_mlp_loss,
        resid_mlp.resid_mlp_ground_truth,
    ),
    "max_of_k": ToyRecipe(
        algorithmic.max_of_k_model,
        algorithmic.max_of_k_inputs,
        algorithmic.max_of_k_loss,
        task_metrics=algorithmic.max_of_k_accuracy,
    ),
    "modular_addition": ToyRecipe(
        algorithmic.modular_addition_model,
        algorithmic.modular_addition_inputs,
        algorithmic.modular_addition_loss,
        task_metrics=algorithmic.modular_addition_accuracy,
    ),
    "induction": ToyRecipe(
        induction.InductionTransformer,
        induction.induction_inputs,
        induction.induction_loss,
        task_metrics=induction.induction_metrics,
    ),
}


class _TargetFile(StrictModel):
    """Wrapper that lets pydantic pick the target kind from `kind`."""

    target: TargetConfig


def target_name(config: TargetConfig) -> str:
    if isinstance(config, TMSConfig):
        return f"tms-{config.n_features}-{config.n_hidden}" + ("-id" if config.identity else "")
    if isinstance(config, MaxOfKConfig):
        return f"max-of-{config.n_ctx}-vocab-{config.d_vocab}"
    if isinstance(config, ModularAdditionConfig):
        return f"modular-addition-{config.p}"
    if isinstance(config, InductionConfig):
        return f"induction-vocab-{config.d_vocab}-repeat-{config.max_repeat}"
    assert isinstance(config, ResidMLPConfig)
    return f"resid-mlp-{config.n_layers}"


def build_target(config: TargetConfig, model: nn.Module) -> Target:
    recipe = RECIPES[config.kind]
    return Target(
        name=target_name(config),
        model=model,
        sample_inputs=lambda batch_size, generator: recipe.inputs(config, batch_size, generator),
        ground_truth=recipe.ground_truth(config),
    )


def train_target(config: TargetConfig, run_dir: Path | None = None) -> tuple[Target, float]:
    """Train a toy target from its seeded recipe; returns the target and its final training loss. With `run_dir`,
    training checkpoints there, resumes from it, and logs the task score every `train.eval_every` steps."""
    recipe = RECIPES[config.kind]
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(config.train.seed, "target-init"))
        model = recipe.build(config)
    score = None if recipe.task_metrics is None else lambda trained: recipe.task_metrics(trained, config)
    result = train(
        ModelTraining(model, recipe.loss, score),
        lambda batch_size, generator: recipe.inputs(config, batch_size, generator),
        config.train,
        run_dir=run_dir,
        description=f"train {target_name(config)}",
    )
    return build_target(config, model), result.last_terms["loss"]


def task_metrics(config: TargetConfig, model: nn.Module) -> dict[str, float] | None:
    """The trained model's score on its task (accuracy for the algorithmic toys), or None if the kind has none."""
    score = RECIPES[config.kind].task_metrics
    return None if score is None else score(model, config)


def save_task_metrics(config: TargetConfig, model: nn.Module, directory: Path) -> dict[str, float] | None:
    """Score the model on its task and write `task_metrics.json` beside it (nothing for kinds without one)."""
    metrics = task_metrics(config, model)
    if metrics is not None:
        write_json_atomic(directory / TASK_METRICS_FILE, metrics)
    return metrics


def save_target(target: Target, config: TargetConfig, directory: Path) -> None:
    """Write weights and config atomically (config last, so a directory with a config is complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(directory / MODEL_FILE, target.model.state_dict())
    write_atomic(directory / CONFIG_FILE, lambda tmp: save_yaml(config, tmp))


def load_target(directory: Path) -> tuple[Target, TargetConfig]:
    """Load a saved toy target; a missing or damaged file is a `CheckpointError` naming it."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} holds no trained target ({CONFIG_FILE} missing); train one with `unmerge train-target PRESET`"
        )
    config = validate(_TargetFile, {"target": load_yaml(config_path)}, str(config_path)).target
    model = RECIPES[config.kind].build(config)
    try:
        model.load_state_dict(load_file(str(directory / MODEL_FILE)), strict=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load target weights from {directory / MODEL_FILE}: {error}; delete {directory} to retrain it"
        ) from None
    return build_target(config, model), config


def target_cache_dir(config: TargetConfig) -> Path:
    """Where the trained target of `config` is cached (keyed by the config's digest)."""
    return cache_root() / "targets" / f"{target_name(config)}-{config.digest()}"


def train_and_save_target(config: TargetConfig, directory: Path) -> tuple[Target, float]:
    """Train the target into `directory` (resuming an interrupted training there), then save it and its task
    score; the checkpoints stay beside it with the training log. The target comes back on the CPU, as a loaded
    one does, wherever it trained."""
    target, loss = train_target(config, run_dir=directory)
    target.model.to("cpu")
    if distributed.is_main_process():  # under torchrun every rank trains it (data-parallel), rank 0 saves it
        save_target(target, config, directory)
        save_task_metrics(config, target.model, directory)
    return target, loss


def cached_target(config: TargetConfig) -> Target:
    """The trained target for `config`, trained and saved on first use (under `distributed.training_lock`)."""
    directory = target_cache_dir(config)
    with distributed.training_lock(directory):
        if (directory / CONFIG_FILE).is_file():
            return load_target(directory)[0]
        return train_and_save_target(config, directory)[0]
