"""The one training loop's settings (steps, batch, seed, optimiser, cadences), shared by every method and target."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from unmerge.config.base import NonNegativeFloat, StrictModel


class OptimConfig(StrictModel):
    """Adam(W) with a learning-rate schedule that is a pure function of the step (so resume is exact)."""

    lr: PositiveFloat = Field(1e-3, description="peak learning rate")
    schedule: Literal["constant", "cosine"] = Field("constant", description="decay after warm-up")
    warmup_steps: NonNegativeInt = Field(0, description="linear warm-up from 0")
    final_lr_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.0, description="cosine floor / peak")
    weight_decay: NonNegativeFloat = Field(0.0, description="decoupled weight decay (AdamW); 0 is plain Adam")
    beta2: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="Adam's second-moment decay (unset: torch's 0.999)"
    )


class TrainConfig(StrictModel):
    """The one training loop's settings, shared by every method."""

    steps: PositiveInt = Field(description="optimiser steps")
    batch_size: PositiveInt = Field(description="examples per step (per rank)")
    seed: NonNegativeInt = Field(0, description="fixes data, initialisation and masks")
    optim: OptimConfig = OptimConfig()
    eval_every: NonNegativeInt = Field(0, description="evaluate every N steps (0: only at the end)")
    eval_batch_size: PositiveInt = Field(4096, description="examples per evaluation batch")
    log_every: PositiveInt = Field(50, description="append training losses to train_log.jsonl every N steps")
    checkpoint_every: NonNegativeInt = Field(1000, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: PositiveInt = Field(2, description="how many recent checkpoints to keep")
    threads: NonNegativeInt = Field(0, description="torch threads per process (0: leave torch's default)")
