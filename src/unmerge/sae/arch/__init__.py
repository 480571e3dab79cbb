"""The dictionary architectures, one module each, and the registry that holds them: adding one is a new module
here, its entry in `ARCHITECTURES`, and its config class in `unmerge.config.dictionary`."""

from __future__ import annotations

import torch

from unmerge.config import DictionaryConfig
from unmerge.sae.arch.batchtopk import BatchTopKDictionary
from unmerge.sae.arch.gated import GatedDictionary
from unmerge.sae.arch.jumprelu import JumpReLUDictionary
from unmerge.sae.arch.relu import ReLUDictionary
from unmerge.sae.arch.topk import TopKDictionary
from unmerge.sae.dictionary import Dictionary
from unmerge.sae.registry import Registry

ARCHITECTURES = Registry(ReLUDictionary, TopKDictionary, BatchTopKDictionary, JumpReLUDictionary, GatedDictionary)


def build_dictionary(
    dim: int, config: DictionaryConfig, generator: torch.Generator, output_dim: int | None = None
) -> Dictionary:
    """A fresh dictionary of the architecture `config.activation` names, d = `dim` inputs (and `output_dim`
    outputs for a transcoder), initialised from `generator`."""
    return ARCHITECTURES[config.activation](dim, config, generator, output_dim)


__all__ = [
    "ARCHITECTURES",
    "BatchTopKDictionary",
    "GatedDictionary",
    "JumpReLUDictionary",
    "ReLUDictionary",
    "TopKDictionary",
    "build_dictionary",
]
