"""Dictionary architectures behind one registry: one class and one config per activation, chosen by name; a
second class under a taken name is refused; a field of another architecture is an error naming it; a run saved
before the architectures had their own configs still loads; invariants every registered architecture keeps."""

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
from unmerge.sae.dictionary import Dictionary
from unmerge.sae.registry import Registry
from unmerge.sae.saelens import load_saelens, save_saelens

FIELDS = {"topk": {"k": 3}, "batchtopk": {"k": 3}}  # what an architecture needs beyond the shared fields
DIM, WIDTH = 8, 16
FLAT_METHOD = {  # a dictionary's config.yaml before each architecture had its own config (every field of every one)
    "kind": "dictionary",
    "width": 512,
    "activation": "relu",
    "k": None,
    "penalty": {
        "name": "l1",
        "coeff": 0.03,
        "p": 0.5,
        "p_final": None,
        "epsilon": 0.001,
        "sigma": 0.1,
        "scale": 4.0,
        "decoder_norm_weighted": False,
    },
    "aux_k": None,
    "aux_k_coeff": 0.03125,
    "jumprelu_bandwidth": 0.001,
    "jumprelu_init_threshold": 0.001,
    "l0_coeff": 0.0,
    "init": "random",
    "init_decoder_norm": 0.1,
    "decoder_bias_init": "geometric_median",
    "unit_norm_decoder": True,
    "dead_window": 100000,
    "matryoshka_prefixes": None,
    "normalise_activations": False,
    "refit_magnitudes": False,
    "resample_every": 0,
    "resample_until": 0.5,
    "resample_duplicates": False,
    "resample_misaligned": 0.0,
    "resample_samples": 8192,
    "resample_encoder_norm": 0.2,
    "skip": False,
}


def _randomised(name: str) -> Dictionary:
    """A dictionary of the architecture `name` with every parameter random within its constraints and its state
    set by one training-mode pass (BatchTopK's threshold), in eval mode."""
    generator = torch.Generator().manual_seed(0)
    config = dictionary_config(width=WIDTH, activation=name, **FIELDS.get(name, {}))
    module = build_dictionary(DIM, config, generator)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        module.constrain()
        module(torch.randn(64, DIM, generator=generator))
    return module.eval()


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
    with pytest.raises(ConfigError, match="method: activation must be one of relu, topk, batchtopk, jumprelu, gated"):
        load_dictionary_config("sparse-512-relu-l1", ["method.activation=sigmoid"])


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_every_architecture_folds_its_normalisation_back_exactly(name: str) -> None:
    module = _randomised(name)
    module.input_scale.fill_(4.0)
    x = torch.randn(256, DIM, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        before, latents_before, _ = module(x)
        module.fold_input_scale()
        after, latents_after, _ = module(x)
    assert bool((latents_after > 0).any()) and bool((latents_after == 0).any())  # the comparison is not trivial
    assert float(module.input_scale) == 1.0
    assert torch.equal(after, before) and torch.equal(latents_after, latents_before / 4)


@pytest.mark.parametrize("name", [name for name in ARCHITECTURES.names() if ARCHITECTURES[name].saelens_name])
def test_every_architecture_in_saelens_round_trips_through_its_format(name: str, tmp_path: Path) -> None:
    module = _randomised(name)
    x = torch.randn(256, DIM, generator=torch.Generator().manual_seed(1))
    loaded = load_saelens(save_saelens(module, tmp_path))
    with torch.no_grad():
        expected, latents, _ = module(x)
        got, got_latents, _ = loaded(x)
    assert bool((latents > 0).any()) and bool((latents == 0).any())
    assert torch.equal(got_latents > 0, latents > 0) and torch.allclose(got, expected, atol=1e-6)
    if type(loaded) is type(module):  # BatchTopK comes back as the JumpReLU it is saved as
        assert torch.equal(got, expected) and torch.equal(got_latents, latents)


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


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_a_config_yaml_written_in_the_flat_layout_loads_as_its_architecture(name: str, tmp_path: Path) -> None:
    """Every architecture's fields were saved; l0_coeff did nothing but on JumpReLU, so elsewhere it is dropped."""
    settings = {"activation": name, **FIELDS.get(name, {})}
    owns_l0 = "l0_coeff" in ARCHITECTURE_CONFIGS[name].model_fields
    overrides = [f"method.{key}={value}" for key, value in settings.items()] + (
        ["method.l0_coeff=0.5"] if owns_l0 else []
    )
    config = load_dictionary_config("sparse-512-relu-l1", overrides)
    saved = config.model_dump(mode="json") | {"method": FLAT_METHOD | settings | {"l0_coeff": 0.5}}
    (tmp_path / runs.RUN_CONFIG).write_text(yaml.safe_dump(saved))
    loaded = runs.saved_config(tmp_path, DictionaryRunConfig)
    assert type(loaded.method) is ARCHITECTURE_CONFIGS[name] and loaded == config
    assert runs.differences_from_saved(tmp_path, config) == []
