"""On a CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs them): runs train there end to end at
fp32 and bf16, a step agrees with the CPU's, and the run resumes from its checkpoint on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from unmerge import api
from unmerge.analysis.interventions import subcomponent_examples, unlearned_model
from unmerge.analysis.mechanisms import read_mechanisms
from unmerge.config import OptimConfig
from unmerge.report.figures import spd_figures
from unmerge.spd.method import SPD
from unmerge.targets.resolve import run_target
from unmerge.train.loop import apply_gradients, make_optimizer, step_loss
from unmerge.train.rng import step_generator

from .conftest import TINY_TMS
from .test_language import tiny_dictionary_config
from .test_mechanisms import TOKENS, WINDOWS
from .test_mechanisms import _spd as tiny_lm_spd

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_spd_decomposes_tms_on_cuda(precision: str, tmp_path: Path) -> None:
    config = api.load_run_config("tms-5-2", [*TINY_TMS, "train.device=cuda", f"train.precision={precision}"])
    result = api.decompose(config, tmp_path)
    assert result.metrics["mmcs"] > 0.9
    resumed = api.load_run_config("tms-5-2", [*TINY_TMS, "train.device=cpu", f"train.precision={precision}"])
    assert api.decompose(resumed, tmp_path).resumed_from == 60  # a CUDA run's checkpoint reads back on the CPU


def test_a_dictionary_trains_on_cuda(tmp_path: Path) -> None:
    overrides = ["method.width=256", "train.steps=100", "train.device=cuda", "method.resample_every=50"]
    result = api.train_dictionary(api.load_dictionary_config("sparse-512-relu-l1-resample", overrides), tmp_path)
    assert result.metrics["fvu"] < 0.9


def test_an_spd_step_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    config = api.load_run_config("tms-5-2", TINY_TMS)
    target = run_target(config.target, tmp_path / "target")
    parameters = {}
    for device in (torch.device("cpu"), torch.device("cuda")):
        spd = SPD(target, config.method, seed=0)
        spd.to(device)
        optimizer = make_optimizer(spd.module, OptimConfig())
        batch = target.sample_inputs(256, step_generator(0, "data")).to(device)
        output = step_loss(spd, batch, step_generator(0, "noise"), "fp32")  # the same mask keys on both
        apply_gradients(spd, optimizer, output.loss)
        parameters[device.type] = torch.cat([p.detach().cpu().flatten() for p in spd.module.parameters()])
    torch.testing.assert_close(parameters["cuda"], parameters["cpu"], atol=1e-5, rtol=1e-4)


def test_a_language_model_dictionary_records_trains_and_evaluates_on_cuda(tmp_path: Path, isolated_cache: Path) -> None:
    """The model records the cache, the dictionary trains, and the spliced evaluation runs, all on the card."""
    config = tiny_dictionary_config(tmp_path, isolated_cache)
    config = config.model_copy(update={"train": config.train.model_copy(update={"device": "cuda"})})
    metrics = api.train_dictionary(config, tmp_path / "run").metrics
    assert all(math.isfinite(metrics[key]) for key in ("heldout/fvu", "ce_spliced", "kl_spliced"))


def test_a_language_model_spds_analysis_and_figures_run_on_cuda_as_on_the_cpu(tmp_path: Path) -> None:
    """What a run does after training, while the model is still on the card: subcomponent snippets and ablation
    effects, the mechanisms table, ablation and unlearning, the figures; the numbers are the CPU's."""
    results = {}
    for device in ("cpu", "cuda"):
        spd = tiny_lm_spd()
        spd.to(torch.device(device))
        examples = subcomponent_examples(spd, WINDOWS, TOKENS, 3)
        mechanisms = read_mechanisms(spd, WINDOWS, examples)
        edited = unlearned_model(spd, ["1/0", "3/2"])
        spd_figures(spd, tmp_path / device)
        results[device] = (examples.activations, examples.ablation_effect, mechanisms.examples.ablation_effect, edited)
    for on_cpu, on_cuda in zip(results["cpu"][:3], results["cuda"][:3], strict=True):
        assert on_cuda.device.type == "cpu"
        torch.testing.assert_close(on_cuda, on_cpu, atol=1e-5, rtol=1e-4, equal_nan=True)
    with torch.no_grad():
        torch.testing.assert_close(results["cuda"][3](WINDOWS.cuda()).cpu(), results["cpu"][3](WINDOWS))
