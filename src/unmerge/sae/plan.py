"""A dictionary's `--dry-run`: its parameters (from the dictionary built untrained) and the activations a step
keeps."""

from __future__ import annotations

import torch

from unmerge.config import DictionaryConfig
from unmerge.sae.arch import build_dictionary
from unmerge.train.plan import StepPlan
from unmerge.train.rng import step_generator

LATENT_VALUES = 4  # per latent and row: pre-activation, activation, their gradients


def dictionary_plan(name: str, dim: int, output_dim: int | None, config: DictionaryConfig) -> StepPlan:
    """Counted on the meta device: nothing is allocated, so a plan can say a dictionary will not fit."""
    with torch.device("meta"):
        dictionary = build_dictionary(dim, config, step_generator(0, "plan"), output_dim)
    out = output_dim or dim
    plan = StepPlan(
        title=f"{config.activation} dictionary on {name}: {dim} → {config.width:,} latents → {out}",
        rows_per_example=1,
        activations_per_row=config.width * LATENT_VALUES + 3 * (dim + out),
    )
    for parameter_name, parameter in dictionary.named_parameters():
        plan.parts.append((parameter_name, parameter.numel(), "×".join(map(str, parameter.shape))))
    return plan
