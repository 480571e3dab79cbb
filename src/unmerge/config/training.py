"""The one training loop's settings (steps, batch, seed, optimiser, cadences), shared by every method and target."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_serializer
from pydantic_core.core_schema import SerializationInfo, SerializerFunctionWrapHandler

from unmerge.config.base import DIGEST_CONTEXT, NonNegativeFloat, Seed, StrictModel


class OptimConfig(StrictModel):
    """Adam(W) with a learning-rate schedule that is a pure function of the step (so resume is exact)."""

    lr: PositiveFloat = Field(1e-3, description="peak learning rate")
    schedule: Literal["constant", "cosine", "quarter_cosine", "linear"] = Field(
        "constant", description="decay after warm-up: cosine ½(1 + cos πt), quarter_cosine cos(πt/2), linear 1 − t"
    )
    warmup_steps: NonNegativeInt = Field(0, description="linear warm-up from 0")
    final_lr_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.0, description="the decay's floor / peak")
    weight_decay: NonNegativeFloat = Field(0.0, description="decoupled weight decay (AdamW); 0 is plain Adam")
    beta2: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="Adam's second-moment decay (unset: torch's 0.999)"
    )


class TrainConfig(StrictModel):
    """The one training loop's settings, shared by every method: the `train` section of a run. Each field is also a
    keyword option of `unmerge.decompose` and `unmerge.train_dictionary`.

    Example:
        >>> TrainConfig(steps=2000, batch_size=256, optim=OptimConfig(lr=1e-3, schedule="cosine"), device="cuda")
    """

    steps: PositiveInt = Field(description="optimiser steps")
    batch_size: PositiveInt = Field(description="examples per step (per rank)")
    seed: Seed = Field(0, description="fixes data, initialisation and masks")
    optim: OptimConfig = OptimConfig()
    eval_every: NonNegativeInt = Field(0, description="evaluate every N steps (0: only at the end)")
    eval_batch_size: PositiveInt = Field(4096, description="examples per evaluation batch")
    log_every: PositiveInt = Field(50, description="append training losses to train_log.jsonl every N steps")
    checkpoint_every: NonNegativeInt = Field(1000, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: PositiveInt = Field(2, description="how many recent checkpoints to keep")
    threads: NonNegativeInt = Field(0, description="torch threads per process (0: leave torch's default)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: matmuls under bf16 autocast; weights, optimiser state and losses stay fp32"
    )
    fsdp: bool = Field(
        False,
        description="under torchrun, shard the learned parameters, gradients and Adam state over the ranks with "
        "FSDP2 (SPD: one unit per site, gathered for each step) instead of keeping a full copy on every rank",
    )
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = Field(
        (), description="also send train_log.jsonl's scalars to these (rank 0; wandb offline unless WANDB_MODE)"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return device

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """How a run executes (device, precision at fp32, sharding, loggers) is left out of `digest()` unless set,
        so the keys of cached targets made before these options existed stay valid."""
        data = handler(self)
        if info.context == DIGEST_CONTEXT:
            for name, default in _PLACEMENT_DEFAULTS.items():
                if data.get(name) == default:
                    data.pop(name)
        return data


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
_PLACEMENT_DEFAULTS: dict[str, Any] = {"device": "auto", "precision": "fp32", "fsdp": False, "loggers": []}
