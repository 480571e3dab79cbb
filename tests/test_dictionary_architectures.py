"""Dictionary architectures behind one registry: one class and one config per activation, chosen by name; a
second class under a taken name is refused; a field of another architecture is an error naming it; a run saved
before the architectures had their own configs still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from unmerge import runs
from unmerge.config import ARCHITECTURE_CONFIGS, DictionaryRunConfig, dictionary_config, load_dictionary_config
from unmerge.errors import ConfigError
from unmerge.sae.arch import ARCHITECTURES, ReLUDictionary, build_dictionary
from unmerge.sae.registry import Registry

FIELDS = {"topk": {"k": 3}, "batchtopk": {"k": 3}}  # what an architecture needs beyond the shared fields


def test_every_registered_architecture_has_its_config_and_builds_from_it() -> None:
    assert ARCHITECTURES.names() == list(ARCHITECTURE_CONFIGS)
    for name in ARCHITECTURES.names():
        config = dictionary_config(width=8, activation=name, **FIELDS.get(name, {}))
        assert type(config) is ARCHITECTURE_CONFIGS[name]
        module = build_dictionary(4, config, torch.Generator().manual_seed(0))
        assert type(module) is ARCHITECTURES[name] and module.activation == name
        reconstruction, latents, _ = module.eval()(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)))
        assert reconstruction.shape == (5, 4) and latents.shape == (5, 8) and bool((latents >= 0).all())


def test_the_registry_refuses_a_duplicate_and_names_the_known_architectures() -> None:
    registry = Registry(ReLUDictionary)
    with pytest.raises(ValueError, match="'relu' is registered already"):
        registry.register(ReLUDictionary)
    with pytest.raises(ConfigError, match="unknown dictionary activation 'sigmoid'; choose one of relu"):
        registry["sigmoid"]


def test_a_field_of_another_architecture_is_named() -> None:
    with pytest.raises(ValidationError, match="k"):
        dictionary_config(width=8, k=3)  # relu has no k
    with pytest.raises(ConfigError, match=r"method\.l0_coeff: unknown key for activation=topk"):
        load_dictionary_config("sparse-512-topk", ["method.l0_coeff=0.1"])
    assert load_dictionary_config("sparse-512-relu-l1", ["method.activation=jumprelu", "method.l0_coeff=0.1"])


def test_a_run_saved_with_the_flat_dictionary_config_loads(tmp_path: Path) -> None:
    config = load_dictionary_config("sparse-512-relu-l1", ["method.activation=jumprelu", "method.l0_coeff=0.01"])
    saved = config.model_dump(mode="json")
    saved["method"] |= {"k": None, "aux_k": None, "aux_k_coeff": 1 / 32}  # as every flat config held them
    (tmp_path / runs.RUN_CONFIG).write_text(yaml.safe_dump(saved))
    assert runs.saved_config(tmp_path, DictionaryRunConfig) == config
    assert runs.differences_from_saved(tmp_path, config) == []  # so the run resumes
    saved["method"]["aux_k"] = 16  # a setting this architecture cannot have is not dropped silently
    (tmp_path / runs.RUN_CONFIG).write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"method\.aux_k: unknown key for activation=jumprelu"):
        runs.saved_config(tmp_path, DictionaryRunConfig)
