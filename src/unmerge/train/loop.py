"""The one training loop, shared by every method (SPD, dictionaries, APD) and by toy-target training.

A method is anything with a `module` (the learned state to checkpoint), a `before_training()` hook for a fresh
start, a `training_loss(batch, generator)`, an `after_step(optimizer)` hook and an `evaluate()`. Each step is named
up front: draw the batch, compute the loss, check it is finite, step the optimiser; then log, evaluate and
checkpoint when their cadence says so. Data and noise come from counter-based generators (`rng.step_generator`)
on the run's device, so a resumed run is bitwise identical to an uninterrupted one.

Under torchrun the global batch (`train.batch_size`) is split over the ranks: every rank draws the same global
batch (the data stream does not depend on the rank) and keeps its own slice, or reads only its slice from a
`PartSampler` (a streamed activation cache); mask noise is drawn per rank. With `train.precision: bf16` the loss is
computed under bf16 autocast and returned in fp32; weights and optimiser state stay fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from unmerge.config import OptimConfig, TrainConfig
from unmerge.errors import CheckpointError, ConfigError, NonFiniteLossError, warn
from unmerge.runs import EVAL_LOG, TRAIN_LOG
from unmerge.train import checkpoint, distributed
from unmerge.train.devices import autocast
from unmerge.train.loggers import ScalarLoggers
from unmerge.train.memory import keep_freed_memory
from unmerge.train.progress import progress_bar
from unmerge.train.rng import step_generator
from unmerge.train.schedule import learning_rate


@dataclass
class StepOutput:
    """A method's loss for one batch: the scalar to minimise and its named terms (already weighted or not)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def weighted(cls, terms: dict[str, Tensor], coefficients: dict[str, float]) -> StepOutput:
        """The loss `Σ coefficient × term` over the terms (each named in `coefficients`), with the terms as they are."""
        return cls(loss=sum(coefficients[name] * value for name, value in terms.items()), terms=terms)


class Method(Protocol):
    module: nn.Module

    def to(self, device: torch.device) -> None:
        """Move everything the method computes with (its module, and a target it runs) to `device`."""

    def before_training(self) -> None:
        """Called once when a run starts from step 0 (not on resume), before the first optimiser step."""

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called before every step's loss, with its index (also after a resume): for schedules that follow the
        progress of training (SPD's annealed p)."""

    def training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimiser step: constraints on the parameters (e.g. unit-norm decoder rows) and
        edits that must also reset the optimiser's state (e.g. resampled dictionary latents)."""

    def evaluate(self) -> dict[str, float]: ...


BatchSampler = Callable[[int, torch.Generator], Tensor]


@runtime_checkable
class PartSampler(Protocol):
    """A sampler that can read one rank's slice of a step's global batch without the rest (a streamed cache)."""

    def __call__(self, size: int, generator: torch.Generator) -> Tensor: ...

    def part(self, step: int, global_size: int, rank: int, world: int) -> Tensor: ...


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

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def begin_step(self, step: int, total_steps: int) -> None:
        """No schedule."""

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


def step_loss(method: Method, batch: Tensor, noise: torch.Generator, precision: str) -> StepOutput:
    """The method's loss on its batch, under bf16 autocast for `precision: bf16`; the loss itself in fp32."""
    with autocast(batch.device, precision):
        output = method.training_loss(batch, noise)
    return StepOutput(output.loss.float(), output.terms)


def apply_gradients(method: Method, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """Backward, average gradients over ranks, step the optimiser, then the method's constraints."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()
    method.after_step(optimizer)


def _append_jsonl(path: Path, record: dict[str, float]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    lines = [(line, _logged_step(line)) for line in path.read_text(errors="replace").splitlines() if line.strip()]
    unreadable = sum(step is None for _, step in lines)
    if unreadable:
        warn(f"{path}: dropped {unreadable} unreadable line(s) (a killed process can leave one half-written)")
    path.write_text("".join(line + "\n" for line, step in lines if step is not None and step <= after_step))


def _logged_step(line: str) -> float | None:
    """A log line's step; None for a line that does not read as a record."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _resume(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into module and optimiser; return its step (0 if none). A run resumes on as
    many processes as it was trained on: each rank's mask noise is its own stream, so another count would give a
    different run."""
    state = checkpoint.restore_newest(run_dir, module, optimizer)
    if not state:
        return 0
    trained_on, now = state.get("world_size", 1), distributed.world_size()
    if trained_on != now:
        raise CheckpointError(
            f"{run_dir} was trained on {trained_on} process(es) and is resumed on {now}; resume it with "
            f"torchrun --nproc-per-node {trained_on} (1: without torchrun), or start a new --out directory"
        )
    return int(state["step"])


def _rank_batch(sample_batch: BatchSampler, step: int, global_size: int, generator: torch.Generator) -> Tensor:
    """This rank's slice of step `step`'s global batch, on the generator's device."""
    rank, world = distributed.rank(), distributed.world_size()
    if isinstance(sample_batch, PartSampler):
        return sample_batch.part(step, global_size, rank, world).to(generator.device)
    batch = sample_batch(global_size, generator)
    if world == 1:
        return batch
    size = global_size // world
    return batch[rank * size : (rank + 1) * size]


def _shard(method: Method, config: TrainConfig) -> list[nn.Module]:
    """With `train.fsdp` under torchrun, shard the method's FSDP units (`fsdp_units()`); the units (none else)."""
    if not (config.fsdp and distributed.is_distributed()):
        return []
    units = getattr(method, "fsdp_units", None)
    if units is None:
        raise ConfigError(
            f"train.fsdp shards SPD's sites; {type(method).__name__} keeps a full copy on every rank: unset train.fsdp"
        )
    sharded = units()
    distributed.shard(sharded)
    return sharded


def _check_batch_split(batch_size: int) -> None:
    world = distributed.world_size()
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size={batch_size} (the global batch) does not split evenly over {world} processes; "
            f"choose a multiple of {world}"
        )


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
    device = distributed.start(config)
    _check_batch_split(config.batch_size)
    method.to(device)
    units = _shard(method, config)
    optimizer = make_optimizer(method.module, config.optim)
    rank, writes = distributed.rank(), run_dir is not None and distributed.is_main_process()
    start = _resume(run_dir, method.module, optimizer) if run_dir is not None else 0
    if start == 0:
        method.before_training()
    loggers = ScalarLoggers(run_dir if writes else None, config.loggers, description)
    if writes:
        assert run_dir is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        for log in (TRAIN_LOG, EVAL_LOG):
            _truncate_log(run_dir / log, start)
    last_terms: dict[str, float] = {}
    progress = progress_bar(
        range(start, config.steps),
        shown=distributed.is_main_process(),
        initial=start,
        total=config.steps,
        desc=description,
    )
    for step in progress:
        lr = learning_rate(config.optim, step, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _rank_batch(sample_batch, step, config.batch_size, step_generator(config.seed, "data", step, 0, device))
        noise = step_generator(config.seed, "noise", step, rank, device)
        method.begin_step(step, config.steps)
        output = step_loss(method, batch, noise, config.precision)
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"the loss became {float(output.loss.detach())} at step {step} (terms: {_scalars(output.terms)}); "
                f"the last good checkpoint is untouched. Rerun the same command with train.optim.lr="
                f"{config.optim.lr / 10:g} (a tenth) added: the run resumes from that checkpoint and records the "
                "change in train_log.jsonl. Other changes (the loss coefficients) need a new --out directory."
            )
        apply_gradients(method, optimizer, output.loss)
        done = step + 1
        is_last = done == config.steps
        if done % config.log_every == 0 or is_last:
            last_terms = distributed.mean_across_ranks({"loss": float(output.loss.detach()), **_scalars(output.terms)})
            progress.set_postfix({k: f"{v:.3g}" for k, v in last_terms.items()}, refresh=False)
            if writes:
                _append_jsonl(run_dir / TRAIN_LOG, {"step": done, "lr": lr, **last_terms})
                loggers.log("train", done, {"lr": lr, **last_terms})
        if config.eval_every and done % config.eval_every == 0 and not is_last:
            metrics = distributed.mean_across_ranks(method.evaluate())
            if writes:
                _append_jsonl(run_dir / EVAL_LOG, {"step": done, **metrics})
                loggers.log("eval", done, metrics)
        due = run_dir is not None and (is_last or (config.checkpoint_every and done % config.checkpoint_every == 0))
        if due and (writes or units):  # sharded state is gathered by every rank, written by rank 0
            tensors = checkpoint.checkpoint_tensors(method.module, optimizer)
            if writes:
                state = {"lr": lr, "world_size": distributed.world_size()}
                checkpoint.save_checkpoint(run_dir, done, tensors, state, keep=config.keep_checkpoints)
    distributed.gather(units)
    progress.close()
    loggers.close()
    return TrainResult(steps=config.steps, resumed_from=start, last_terms=last_terms)
