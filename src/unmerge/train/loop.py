"""The one training loop, shared by every method (SPD, dictionaries, APD) and by toy-target training.

A method is anything with a `module` (the learned state to checkpoint), a `before_training()` hook for a fresh
start, a `training_loss(batch, generator)`, an `after_step(optimizer)` hook and an `evaluate()`. Each step is named
up front: draw the batch, compute the loss, check it is finite, step the optimiser; then log, evaluate and
checkpoint when their cadence says so. Data and noise come from counter-based generators (`rng.step_generator`),
so a resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unmerge.config import OptimConfig, TrainConfig
from unmerge.errors import NonFiniteLossError
from unmerge.runs import EVAL_LOG, TRAIN_LOG
from unmerge.train import checkpoint, distributed
from unmerge.train.memory import keep_freed_memory
from unmerge.train.rng import step_generator
from unmerge.train.schedule import learning_rate


@dataclass
class StepOutput:
    """A method's loss for one batch: the scalar to minimise and its named terms (already weighted or not)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class Method(Protocol):
    module: nn.Module

    def before_training(self) -> None:
        """Called once when a run starts from step 0 (not on resume), before the first optimiser step."""

    def training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimiser step: constraints on the parameters (e.g. unit-norm decoder rows) and
        edits that must also reset the optimiser's state (e.g. resampled dictionary latents)."""

    def evaluate(self) -> dict[str, float]: ...


BatchSampler = Callable[[int, torch.Generator], Tensor]


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    last_terms: dict[str, float]


class ModelTraining:
    """Adapts a model and its loss to the method interface, to train the model itself (toy targets, the small
    language model): no preparation, no constraints; evaluation is the model's task score if one is given."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, Tensor], Tensor],
        score: Callable[[nn.Module], dict[str, float]] | None = None,
    ) -> None:
        self.module = model
        self.loss = loss
        self.score = score

    def before_training(self) -> None:
        """Nothing to prepare: the model is initialised by its builder."""

    def training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput:
        return StepOutput(loss=self.loss(self.module, batch))

    def evaluate(self) -> dict[str, float]:
        return {} if self.score is None else self.score(self.module)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """No constraints on the model's parameters."""


def make_optimizer(module: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the module's parameters that need gradients, updating them all with one multi-tensor (foreach)
    kernel per operation: the same arithmetic, element by element, as one tensor at a time, with less overhead."""
    betas = {} if optim.beta2 is None else {"betas": (0.9, optim.beta2)}
    parameters = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay, foreach=True, **betas)


def _append_jsonl(path: Path, record: dict[str, float]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def _resume(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into module and optimiser; return its step (0 if none)."""
    saved = checkpoint.checkpoint_dirs(run_dir)
    if not saved:
        return 0
    return int(checkpoint.restore(saved[-1], module, optimizer)["step"])


def _scalars(terms: dict[str, Tensor]) -> dict[str, float]:
    return {name: float(value.detach()) for name, value in terms.items()}


def train(
    method: Method,
    sample_batch: BatchSampler,
    config: TrainConfig,
    run_dir: Path | None = None,
    description: str = "train",
) -> TrainResult:
    """Optimise `method.module` for `config.steps` steps, resuming from `run_dir`'s newest checkpoint if any."""
    keep_freed_memory()
    optimizer = make_optimizer(method.module, config.optim)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    rank, writes = distributed.rank(), run_dir is not None and distributed.is_main_process()
    start = _resume(run_dir, method.module, optimizer) if run_dir is not None else 0
    if start == 0:
        method.before_training()
    if writes:
        assert run_dir is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        for log in (TRAIN_LOG, EVAL_LOG):
            _truncate_log(run_dir / log, start)
    last_terms: dict[str, float] = {}
    progress = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc=description,
        disable=None if distributed.is_main_process() else True,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    for step in progress:
        lr = learning_rate(config.optim, step, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(config.batch_size, step_generator(config.seed, "data", step, rank))
        output = method.training_loss(batch, step_generator(config.seed, "noise", step, rank))
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"the loss became {float(output.loss.detach())} at step {step} (terms: {_scalars(output.terms)}); "
                f"the last good checkpoint is untouched. Lower the learning rate (train.optim.lr={lr:g} now) or "
                "the loss coefficients, then rerun the same command to resume."
            )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        distributed.average_gradients(parameters)
        optimizer.step()
        method.after_step(optimizer)
        done = step + 1
        is_last = done == config.steps
        if done % config.log_every == 0 or is_last:
            last_terms = distributed.mean_across_ranks({"loss": float(output.loss.detach()), **_scalars(output.terms)})
            progress.set_postfix({k: f"{v:.3g}" for k, v in last_terms.items()}, refresh=False)
            if writes:
                _append_jsonl(run_dir / TRAIN_LOG, {"step": done, "lr": lr, **last_terms})
        if config.eval_every and done % config.eval_every == 0 and not is_last:
            metrics = distributed.mean_across_ranks(method.evaluate())
            if writes:
                _append_jsonl(run_dir / EVAL_LOG, {"step": done, **metrics})
        if writes and (is_last or (config.checkpoint_every and done % config.checkpoint_every == 0)):
            tensors = checkpoint.checkpoint_tensors(method.module, optimizer)
            checkpoint.save_checkpoint(run_dir, done, tensors, {"lr": lr}, keep=config.keep_checkpoints)
    progress.close()
    return TrainResult(steps=config.steps, resumed_from=start, last_terms=last_terms)
