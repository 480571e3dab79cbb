"""SAELens interop: export and import round trips per architecture, the format's own formulas, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unmerge import api, cli, runs
from unmerge.config import DictionaryConfig, dictionary_config
from unmerge.errors import UnmergeError
from unmerge.sae.arch import build_dictionary
from unmerge.sae.dictionary import Dictionary
from unmerge.sae.saelens import CONFIG_FILE, WEIGHTS_FILE, load_saelens, save_saelens

DIM, WIDTH, OUT = 8, 16, 6


def _randomised(config: DictionaryConfig, output_dim: int | None = None) -> Dictionary:
    """A dictionary with every parameter random (biases, thresholds and gates included), in eval mode."""
    generator = torch.Generator().manual_seed(0)
    module = build_dictionary(DIM, config, generator, output_dim)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        if config.activation == "jumprelu":
            module.threshold.fill_(0.2)
        if config.activation == "batchtopk":
            module.inference_threshold.fill_(0.3)
    return module.eval()


CASES = {
    "relu": (dictionary_config(width=WIDTH), None),
    "topk": (dictionary_config(width=WIDTH, activation="topk", k=3), None),
    "batchtopk": (dictionary_config(width=WIDTH, activation="batchtopk", k=3), None),
    "jumprelu": (dictionary_config(width=WIDTH, activation="jumprelu"), None),
    "gated": (dictionary_config(width=WIDTH, activation="gated"), None),
    "transcoder": (dictionary_config(width=WIDTH), OUT),
    "skip-transcoder": (dictionary_config(width=WIDTH, skip=True), OUT),
    "jumprelu-transcoder": (dictionary_config(width=WIDTH, activation="jumprelu"), OUT),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_then_import_gives_the_same_latents_and_reconstructions(case: str, tmp_path: Path) -> None:
    config, output_dim = CASES[case]
    module = _randomised(config, output_dim)
    save_saelens(module, tmp_path / case, hook_name="blocks.3.hook_resid_post")
    saved = json.loads((tmp_path / case / CONFIG_FILE).read_text())
    assert (saved["d_in"], saved["d_sae"]) == (DIM, WIDTH)
    assert saved["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    loaded = load_saelens(tmp_path / case)
    x = torch.randn(256, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, latents, _ = module(x)
        got, got_latents, _ = loaded(x)
    assert (latents > 0).sum() > 0 and (latents == 0).sum() > 0  # the comparison is not trivial
    if case in ("relu", "topk", "gated", "transcoder", "skip-transcoder"):
        assert torch.equal(got, expected) and torch.equal(got_latents, latents)
    else:  # a threshold goes through log and exp
        assert torch.allclose(got, expected, atol=1e-6) and torch.equal(got_latents > 0, latents > 0)


def _write(directory: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(directory / WEIGHTS_FILE))
    return directory


def _standard_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        "W_enc": torch.randn(DIM, WIDTH, generator=generator),
        "b_enc": torch.randn(WIDTH, generator=generator),
        "W_dec": torch.randn(WIDTH, DIM, generator=generator),
        "b_dec": torch.randn(DIM, generator=generator),
    }


def test_import_follows_the_formats_formulas_without_b_dec_on_the_input_and_with_rescaled_topk(tmp_path: Path) -> None:
    t = _standard_tensors()
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(3))
    plain = load_saelens(
        _write(tmp_path / "plain", {"d_in": DIM, "d_sae": WIDTH, "dtype": "float32", "apply_b_dec_to_input": False}, t)
    )
    with torch.no_grad():
        latents = plain(x)[1]
    assert torch.allclose(latents, F.relu(x @ t["W_enc"] + t["b_enc"]), atol=1e-5)
    topk_config = {
        "d_in": DIM,
        "d_sae": WIDTH,
        "dtype": "float32",
        "k": 4,
        "architecture": "topk",
        "rescale_acts_by_decoder_norm": True,
    }
    rescaled = load_saelens(_write(tmp_path / "topk", topk_config, t))
    norms = t["W_dec"].norm(dim=1)
    hidden = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    top = hidden.topk(4, dim=1)
    f = torch.zeros_like(hidden).scatter(1, top.indices, top.values.relu())
    with torch.no_grad():
        assert torch.allclose(rescaled(x)[0], (f / norms) @ t["W_dec"] + t["b_dec"], atol=1e-5)
    threshold = torch.linspace(-0.5, 0.5, WIDTH)  # SAELens's relu(h)·1[h > θ]: a θ ≤ 0 acts as θ = 0
    jumprelu = load_saelens(
        _write(
            tmp_path / "jumprelu",
            {"d_in": DIM, "d_sae": WIDTH, "dtype": "float32", "architecture": "jumprelu"},
            t | {"threshold": threshold},
        )
    )
    hidden = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    with torch.no_grad():
        assert torch.allclose(jumprelu(x)[1], hidden.relu() * (hidden > threshold), atol=1e-5)


def test_unreadable_or_unsupported_saelens_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(UnmergeError, match="cfg.json is missing"):
        load_saelens(tmp_path)
    base = {"d_in": DIM, "d_sae": WIDTH, "dtype": "float32"}
    with pytest.raises(UnmergeError, match="normalize_activations='layer_norm'"):
        load_saelens(_write(tmp_path / "norm", base | {"normalize_activations": "layer_norm"}, _standard_tensors()))
    with pytest.raises(UnmergeError, match="architecture 'temporal' cannot be imported"):
        load_saelens(_write(tmp_path / "arch", base | {"architecture": "temporal"}, _standard_tensors()))
    with pytest.raises(UnmergeError, match="do not match"):
        load_saelens(_write(tmp_path / "shape", base | {"d_sae": WIDTH + 1}, _standard_tensors()))
    truncated = _write(tmp_path / "cut", base, _standard_tensors())
    data = (truncated / WEIGHTS_FILE).read_bytes()
    (truncated / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UnmergeError, match="cannot be read"):
        load_saelens(truncated)
    with pytest.raises(UnmergeError, match="SAELens has no topk transcoder"):
        save_saelens(_randomised(dictionary_config(width=WIDTH, activation="topk", k=2), OUT), tmp_path / "tc")


def test_a_trained_run_exported_by_the_cli_reloads_with_identical_reconstructions(tmp_path: Path) -> None:
    config = api.load_dictionary_config("hierarchy-relu-l1", ["train.steps=30", "method.normalise_activations=true"])
    api.train_dictionary(config, tmp_path / "run")
    assert cli.main(["export-saelens", str(tmp_path / "run"), "--out", str(tmp_path / "saelens")]) == 0
    _, trained = api.load_dictionary(tmp_path / "run")
    loaded = load_saelens(tmp_path / "saelens")
    x = torch.randn(128, trained.W_e.shape[0], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], trained(x)[0])
    (tmp_path / "run" / runs.DICTIONARY_FILE).write_bytes(b"not a safetensors file")
    assert cli.main(["export-saelens", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 2
