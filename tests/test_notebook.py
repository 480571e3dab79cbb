"""The notebook-first API (issue 25): `unmerge.decompose(model, data, sites=...)` on any module and data, and the
`Decomposition` it returns; its run directories are the command line's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

import unmerge
from unmerge import api, cli, runs
from unmerge.errors import ConfigError, SiteError, UnmergeError

FAST = {"steps": 30, "batch_size": 64, "eval_batch_size": 256, "checkpoint_every": 10}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))


def _data(rows: int = 512) -> torch.Tensor:
    return torch.randn(rows, 6, generator=torch.Generator().manual_seed(1))


class KeywordModel(nn.Module):
    """Takes a Hugging Face style batch (`input_ids`, `attention_mask`) as keywords and returns an output object
    with `logits`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.mlp_in = nn.Linear(8, 16)
        self.mlp_out = nn.Linear(16, 20)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        hidden = self.embed(input_ids) * attention_mask[..., None]
        return type("Output", (), {"logits": self.mlp_out(torch.relu(self.mlp_in(hidden)))})()


def _final_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(runs.saved_steps(run_dir)[-1] / "weights.safetensors"))


def test_an_own_model_decomposes_and_is_explored_in_memory() -> None:
    model = _mlp()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    found = unmerge.decompose(model, _data(), sites={"0": 8, "2": 8}, **FAST)
    assert found.run_dir is None and found.step == 30 and found.sites == ["0", "2"]
    assert {"faithfulness", "stochastic_recon", "ci_masked_recon", "alive", "ci_l0/0.1"} <= set(found.final_metrics)
    importance = found.causal_importance(torch.randn(5, 6))
    assert importance["0"].shape == (5, 8) and importance["2"].shape == (5, 8)
    assert float(importance["0"].min()) >= 0.0 and float(importance["0"].max()) <= 1.0
    pieces = found.subcomponents["0"]
    assert pieces.U.shape == (12, 8) and pieces.V.shape == (8, 6) and pieces.weight.shape == model[0].weight.shape

    edited = found.ablate(["0/1", "2/3"])
    assert isinstance(edited, nn.Sequential)
    expected = model[0].weight - pieces.U[:, 1:2] @ pieces.V[1:2]
    assert torch.allclose(edited[0].weight, expected, atol=1e-6)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # untouched

    components = found.components(n_inputs=512, min_active=1)
    assert components and {unit for c in components for unit in c.subcomponents} <= {
        f"{site}/{c}" for site in ("0", "2") for c in range(8)
    }
    assert isinstance(found.ablate(components[0]), nn.Sequential)
    on_given = found.metrics(_data(100))
    assert set(found.final_metrics) <= set(on_given) and on_given["faithfulness"] == found.final_metrics["faithfulness"]


def test_dict_batches_from_a_dataloader_with_kl_and_a_divergence_function() -> None:
    ids = torch.randint(20, (64, 10), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    loader = DataLoader(rows, batch_size=16)
    found = unmerge.decompose(KeywordModel(), loader, sites={"mlp_*": 6}, output_loss="kl", **FAST)
    assert found.final_metrics["ci_masked_recon"] >= 0.0
    assert found.causal_importance(next(iter(loader)))["mlp_in"].shape == (16, 10, 6)

    calls = []

    def mean_absolute(output: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        calls.append(output.shape)
        return (output - original).abs().mean()

    custom = unmerge.decompose(KeywordModel(), loader, sites={"mlp_in": 6}, output_loss=mean_absolute, **FAST)
    assert calls and custom.config.method.output_loss == "function"
    with pytest.raises(ConfigError, match="keys"):
        custom.causal_importance(ids[:2])


def test_save_and_load_round_trip_and_the_model_is_checked(tmp_path) -> None:
    model, data = _mlp(), _data()
    found = unmerge.decompose(model, data, sites={"0": 8}, **FAST)
    saved = found.save(tmp_path / "run")
    assert runs.is_finished(saved) and (saved / "report.html").is_file()
    back = unmerge.Decomposition.load(saved, model=model, data=data)
    x = torch.randn(7, 6)
    assert torch.equal(back.causal_importance(x)["0"], found.causal_importance(x)["0"])
    assert back.final_metrics == pytest.approx(found.final_metrics)
    with pytest.raises(ConfigError, match="model=..., data=..."):
        unmerge.Decomposition.load(saved)
    other = _mlp()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ConfigError, match="sha256 differs"):
        unmerge.Decomposition.load(saved, model=other, data=data)
    with pytest.raises(UnmergeError, match="empty directory"):
        unmerge.decompose(_mlp(), data, sites={"0": 4}, steps=2, batch_size=8).save(saved)
    # the command line reads it, and says how to load what only Python holds
    assert cli.main(["report", str(saved), "--out", str(tmp_path / "index")]) == 0
    assert cli.main(["evaluate", str(saved)]) == 2


def test_a_run_directory_resumes_to_the_same_result(tmp_path) -> None:
    model, data = _mlp(), _data()
    unmerge.decompose(model, data, sites={"0": 8}, run_dir=tmp_path / "whole", **FAST)
    calls = 0

    def breaks_at_step_15(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 15 * 3 + 2:  # clean, stochastic and layerwise passes per step, plus the first check
            raise KeyboardInterrupt
        return module(x)

    with pytest.raises(KeyboardInterrupt):
        unmerge.decompose(model, data, sites={"0": 8}, run_dir=tmp_path / "cut", forward=breaks_at_step_15, **FAST)
    assert [p.name for p in runs.saved_steps(tmp_path / "cut")] == ["step-0000010"]
    resumed = unmerge.decompose(model, data, sites={"0": 8}, run_dir=tmp_path / "cut", **FAST)
    assert resumed.step == 30
    whole, cut = _final_tensors(tmp_path / "whole"), _final_tensors(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    with pytest.raises(UnmergeError, match="train.steps: 30 → 40"):
        unmerge.decompose(model, data, sites={"0": 8}, run_dir=tmp_path / "cut", **{**FAST, "steps": 40})


def test_an_iterable_stream_resumes_to_the_same_result(tmp_path) -> None:
    model, batches = _mlp(), list(_data(600).split(50))
    unmerge.decompose(model, batches, sites={"0": 8}, run_dir=tmp_path / "whole", **FAST)
    whole = _final_tensors(tmp_path / "whole")
    steps_10 = {**FAST, "checkpoint_every": 10}
    calls = 0

    def breaks(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 15 * 3 + 2:
            raise KeyboardInterrupt
        return module(x)

    with pytest.raises(KeyboardInterrupt):
        unmerge.decompose(model, batches, sites={"0": 8}, run_dir=tmp_path / "cut", forward=breaks, **steps_10)
    unmerge.decompose(model, batches, sites={"0": 8}, run_dir=tmp_path / "cut", **steps_10)
    cut = _final_tensors(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_configured_run_loads_in_python(tmp_path) -> None:
    config = unmerge.load_run_config("tms-5-2", ["train.steps=20", "train.eval_batch_size=256"])
    api.decompose(config, tmp_path / "tms")
    found = unmerge.Decomposition.load(tmp_path / "tms")
    assert found.sites == ["linear1", "linear2"] and "mmcs" in found.final_metrics
    assert found.causal_importance(torch.eye(5))["linear1"].shape == (5, config.method.sites[0].C)
    assert "mmcs" in found.metrics()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"sites": {"nope.*": 4}}, SiteError, "matches no module.*decomposable modules are: 0, 2"),
        ({"sites": {"1": 4}}, SiteError, "not a linear map"),
        ({"sites": {"0": 4}, "stepz": 3}, ConfigError, "unknown option 'stepz' \\(did you mean steps"),
        ({"sites": {"0": 0}}, ConfigError, "method.sites.0.C"),
        ({}, ConfigError, "say which weights to decompose"),
        ({"sites": {"0": 4}, "output_loss": "kll"}, ConfigError, "'mse', 'kl' \\(of logits\\) or a function"),
    ],
)
def test_what_a_user_passes_wrong_is_named(options, error, message) -> None:
    with pytest.raises(error, match=message):
        unmerge.decompose(_mlp(), _data(), **{"steps": 2, "batch_size": 8, **options})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.randn(10, 3), r"two rows of the data \(\(2, 3\).*mat1 and mat2"),
        ("text", "not a str"),
        (iter([torch.randn(4, 6)]), "iterator, which can be read only once"),
        (torch.randn(0, 6), "no rows"),
        ({"a": torch.zeros(4, 6), "b": torch.zeros(4, 6, dtype=torch.long)}, "differ in shape or dtype"),
    ],
)
def test_data_the_model_cannot_take_is_named(data, message) -> None:
    with pytest.raises(UnmergeError, match=message):
        unmerge.decompose(_mlp(), data, sites={"0": 4}, steps=2, batch_size=8)


def test_a_config_passed_as_the_model_points_to_the_config_api() -> None:
    with pytest.raises(ConfigError, match="unmerge.api.decompose"):
        unmerge.decompose(unmerge.load_run_config("tms-5-2"), "runs/x")
