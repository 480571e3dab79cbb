"""`unmerge.train_dictionary` on a model a notebook holds or on activations given directly, and the `Dictionary` it
returns: encodings exactly the forward's, metrics, resuming, the run directory round trip, SAELens export, and
errors that name the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from unmerge import api, runs
from unmerge.config import dictionary_preset_names, load_dictionary_config
from unmerge.errors import CheckpointError, ConfigError, UnmergeError
from unmerge.notebook.dictionary import Dictionary, train_dictionary
from unmerge.sae.method import DictionaryMethod
from unmerge.sae.saelens import CONFIG_FILE, WEIGHTS_FILE, load_saelens
from unmerge.targets.activations import target_activation_source
from unmerge.targets.own import own_target
from unmerge.train.loop import PartSampler

FAST = {"steps": 30, "batch_size": 64, "eval_batch_size": 256, "device": "cpu"}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def _inputs(rows: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed))


def _weights(dictionary: Dictionary) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu() for name, value in dictionary.module.state_dict().items()}


def _same(a: Dictionary, b: Dictionary) -> bool:
    left, right = _weights(a), _weights(b)
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


def test_a_dictionary_on_a_models_hidden_layer_encodes_what_its_forward_decodes() -> None:
    model = _mlp()
    sae = train_dictionary(model, "1", _inputs(), **{**FAST, "steps": 50})
    assert isinstance(sae, Dictionary) and sae.hook == "1" and sae.run_dir is None
    assert (sae.dim, sae.width) == (16, 64)  # the default width: 4 · d
    assert sae.config.data.kind == "own_activations" and sae.config.data.weights
    hidden = model[1](model[0](_inputs(32, seed=5)))
    reconstruction, latents, _ = sae.module(hidden)
    assert sae.encode(hidden).shape == (32, 64)
    assert torch.equal(sae.encode(hidden), latents)
    assert torch.equal(sae.reconstruct(hidden), reconstruction)
    assert torch.allclose(sae.decode(sae.encode(hidden)), reconstruction, atol=1e-6)
    assert sae.encode(hidden.reshape(4, 8, 16)).shape == (4, 8, 64)
    assert {"fvu", "l0", "dead_fraction"} <= set(sae.final_metrics) and sae.metrics() == sae.final_metrics
    scored = sae.metrics(hidden)
    assert set(scored) == {"fvu", "reconstruction_cosine", "norm_ratio", "l0"} and 0 < scored["l0"] <= 64


@pytest.mark.parametrize(
    "options",
    [
        {"activation": "topk", "k": 4},
        {"activation": "batchtopk", "k": 4},
        {"activation": "jumprelu"},
        {"activation": "gated"},
    ],
)
def test_every_architecture_encodes_exactly_its_forwards_latents(options: dict) -> None:
    activations = torch.randn(512, 12, generator=torch.Generator().manual_seed(0))
    sae = train_dictionary(activations, width=24, **{**FAST, "steps": 5}, **options)
    x = activations[:40]
    reconstruction, latents, _ = sae.module(x)
    assert torch.equal(sae.encode(x), latents) and torch.equal(sae.reconstruct(x), reconstruction)
    assert sae.module.activation == options["activation"]


def test_activations_given_as_a_tensor_or_as_batches() -> None:
    activations = torch.randn(64, 4, 10, generator=torch.Generator().manual_seed(0))
    from_tensor = train_dictionary(activations, width=20, **FAST)
    assert (from_tensor.dim, from_tensor.width) == (10, 20) and from_tensor.hook is None
    assert "tensor (64, 4, 10) torch.float32, sha256" in from_tensor.config.data.data
    batches = list(activations.split(16))
    from_batches = train_dictionary(batches, hook="blocks.0.hook_resid_post", width=20, **FAST)
    assert from_batches.hook == "blocks.0.hook_resid_post" and from_batches.config.data.data.startswith("an iterable")
    assert _same(from_batches, train_dictionary(batches, hook="blocks.0.hook_resid_post", width=20, **FAST))


def test_a_stream_of_model_inputs_trains_on_its_batches_in_order() -> None:
    """With an iterable of batches, the training loop reads the recorded activations of the stream's own rows
    (`part`), not only its evaluation pool."""
    model = _mlp()
    batches = list(_inputs(320).split(32))
    source = target_activation_source(own_target(model, batches, pool_rows=64), "1")
    assert isinstance(source.sample, PartSampler)
    rows = torch.cat(batches)
    expected = model[1](model[0](rows[200:250]))
    assert torch.equal(source.sample.part(4, 50, 0, 1), expected)  # step 4 of 50-row batches: rows 200 to 250
    assert torch.equal(source.sample.part(4, 50, 1, 2), expected[25:])  # rank 1 of 2 reads its half
    assert source.sample(7, torch.Generator().manual_seed(0)).shape == (7, 16)


def test_a_sequence_models_batches_are_counted_in_rows() -> None:
    model = nn.Sequential(nn.Linear(8, 6))
    source = target_activation_source(own_target(model, torch.randn(40, 5, 8)), "0")
    assert source.sample(12, torch.Generator().manual_seed(0)).shape == (12, 6)  # 3 inputs of 5 positions, cut
    sae = train_dictionary(model, "0", torch.randn(40, 5, 8), width=12, **FAST)
    assert sae.encode(torch.randn(2, 5, 6)).shape == (2, 5, 12)


def test_an_interrupted_run_resumes_bitwise_and_a_finished_one_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batches = _mlp(), list(_inputs(640).split(64))
    settings = {**FAST, "steps": 20, "checkpoint_every": 10}
    in_memory = train_dictionary(model, "1", batches, **settings)
    run_dir = tmp_path / "run"
    train_dictionary(model, "1", batches, run_dir=run_dir, **settings)
    shutil.rmtree(run_dir / runs.CHECKPOINT_DIR / "step-0000020")  # as if killed before the last steps
    for name in (runs.DICTIONARY_FILE, runs.METRICS_FILE):
        (run_dir / name).unlink()
    assert [path.name for path in runs.saved_steps(run_dir)] == ["step-0000010"]
    fresh_starts = []
    initialise = DictionaryMethod.before_training
    monkeypatch.setattr(DictionaryMethod, "before_training", lambda self: fresh_starts.append(initialise(self)))
    resumed = train_dictionary(model, "1", batches, run_dir=run_dir, **settings)
    assert not fresh_starts  # resumed from step 10, not started again
    assert _same(resumed, in_memory) and resumed.run_dir == run_dir
    assert resumed.final_metrics == pytest.approx(in_memory.final_metrics)
    loaded = train_dictionary(model, "1", batches, run_dir=run_dir, **settings)  # finished: loaded as it is
    assert _same(loaded, in_memory) and loaded.final_metrics == runs.read_metrics(run_dir)
    with pytest.raises(CheckpointError, match="different config"):
        train_dictionary(model, "1", batches, run_dir=run_dir, **{**settings, "steps": 40})


def test_save_and_load_round_trip_and_saelens_export(tmp_path: Path) -> None:
    model = _mlp()
    sae = train_dictionary(model, "1", _inputs(), activation="topk", k=6, **FAST)
    saved = sae.save(tmp_path / "saved")
    assert {runs.RUN_CONFIG, runs.DICTIONARY_FILE, runs.METRICS_FILE, "report.html"} <= {
        path.name for path in saved.iterdir()
    }
    loaded = Dictionary.load(saved)
    x = torch.randn(20, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and _same(loaded, sae)
    assert loaded.config == sae.config and loaded.final_metrics == pytest.approx(sae.final_metrics)
    assert loaded.hook == "1" and loaded.run_dir == saved
    assert sae.save(tmp_path / "saved") == saved  # the same run again: allowed
    with pytest.raises(UnmergeError, match="save into an empty directory"):
        train_dictionary(model, "1", _inputs(), width=32, **FAST).save(saved)
    exported = sae.to_saelens(tmp_path / "saelens")
    assert {path.name for path in exported.iterdir()} >= {CONFIG_FILE, WEIGHTS_FILE}
    assert json.loads((exported / CONFIG_FILE).read_text())["metadata"]["hook_name"] == "1"
    assert torch.allclose(load_saelens(exported)(x)[1], sae.encode(x), atol=1e-6)


def test_a_command_line_run_loads(tmp_path: Path) -> None:
    assert "sparse-512-topk" in dictionary_preset_names()
    overrides = ["train.steps=20", "train.eval_batch_size=256", "method.width=64", "train.device=cpu"]
    config = load_dictionary_config("sparse-512-topk", overrides)
    result = api.train_dictionary(config, tmp_path / "cli")
    loaded = Dictionary.load(tmp_path / "cli")
    assert loaded.final_metrics == result.metrics and loaded.width == 64 and loaded.hook is None
    x = torch.randn(8, loaded.dim)
    assert loaded.encode(x).shape == (8, 64)
    assert _same(Dictionary.load(loaded.save(tmp_path / "copy")), loaded)
    assert (tmp_path / "copy" / runs.GROUND_TRUTH_FILE).is_file()


def test_a_transcoder_records_the_modules_input_and_output() -> None:
    model = _mlp()
    sae = train_dictionary(model, "2", _inputs(), transcoder=True, **FAST)
    assert sae.transcoder and (sae.dim, sae.module.W_d.shape[1]) == (16, 8)
    hidden = model[1](model[0](_inputs(16, seed=3)))
    assert sae.reconstruct(hidden).shape == (16, 8)
    assert set(sae.metrics((hidden, model[2](hidden)))) == {"fvu", "reconstruction_cosine", "norm_ratio", "l0"}


def test_a_transcoder_with_a_skip_path_saves_and_loads(tmp_path: Path) -> None:
    model = _mlp()
    sae = train_dictionary(model, "2", _inputs(), transcoder=True, skip=True, **FAST)
    loaded = Dictionary.load(sae.save(tmp_path / "transcoder"))
    assert loaded.transcoder and loaded.config.data.transcoder and _same(loaded, sae)
    hidden = torch.randn(6, 16)
    assert torch.equal(loaded.reconstruct(hidden), sae.reconstruct(hidden))
    assert torch.allclose(loaded.decode(loaded.encode(hidden), hidden), sae.reconstruct(hidden), atol=1e-6)
    with pytest.raises(UnmergeError, match="pass them, decode"):
        loaded.decode(loaded.encode(hidden))


def test_mistakes_are_named_with_their_fix() -> None:
    model, x = _mlp(), _inputs()
    with pytest.raises(ConfigError, match=r"unknown option 'widht' \(did you mean width"):
        train_dictionary(x, widht=32)
    with pytest.raises(UnmergeError, match="has no module 'nope'; hook points: 0, 1, 2"):
        train_dictionary(model, "nope", x, **FAST)
    with pytest.raises(ConfigError, match="needs hook=... .* one of: 0, 1, 2"):
        train_dictionary(model, data=x)
    with pytest.raises(UnmergeError, match=r"shape \(rows, d\) or \(\.\.\., d\), not \(8,\)"):
        train_dictionary(torch.randn(8), **FAST)
    with pytest.raises(ConfigError, match="transcoder=True needs a model"):
        train_dictionary(torch.randn(64, 8), transcoder=True)
    with pytest.raises(ConfigError, match="needs k"):
        train_dictionary(torch.randn(64, 8), activation="topk", **FAST)
    with pytest.raises(ConfigError, match="load_dictionary_config"):
        train_dictionary("sparse-512-topk")
    sae = train_dictionary(torch.randn(64, 8), width=16, **{**FAST, "steps": 2})
    with pytest.raises(UnmergeError, match=r"shape \(\.\.\., 8\), not \(3, 5\)"):
        sae.encode(torch.randn(3, 5))
