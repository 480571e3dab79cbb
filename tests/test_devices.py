"""Devices and precision without a GPU: every tensor a step creates is made on the batch's device (caught by making
the meta device the default, so a tensor created without a device lands there and breaks the step), bf16 autocast
keeps fp32 weights and losses, and `train.device` names a device that exists."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from unmerge import api, cli
from unmerge.config import OptimConfig, TrainConfig
from unmerge.errors import ConfigError
from unmerge.sae.method import DictionaryMethod
from unmerge.spd.method import SPD
from unmerge.targets.resolve import run_target, untrained_target
from unmerge.targets.sources import activation_source
from unmerge.train.devices import autocast, resolve_device
from unmerge.train.loop import Method, apply_gradients, make_optimizer, step_loss
from unmerge.train.rng import step_generator

from .conftest import TINY_TMS

BATCH = 64


def _steps_on_meta_default(method: Method, sample, steps: int = 2) -> None:
    """Train `steps` steps and evaluate with the meta device as torch's default: anything a step creates without
    naming a device is made on meta, which either fails or leaves a loss that is not a finite CPU number."""
    optimizer = make_optimizer(method.module, OptimConfig())
    optimizer.step()  # the optimiser's own state is created here, outside the check
    method.before_training()
    with torch.device("meta"):
        for step in range(steps):
            batch = sample(BATCH, step_generator(0, "data", step))
            assert batch.device.type == "cpu"
            output = method.training_loss(batch, step_generator(0, "noise", step))
            assert output.loss.device.type == "cpu" and bool(torch.isfinite(output.loss))
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            method.after_step(optimizer)
        metrics = method.evaluate()
    assert metrics and all(isinstance(value, int | float) for value in metrics.values())
    assert all(p.device.type == "cpu" for p in method.module.parameters())


@pytest.mark.parametrize("ci_kernel", ["torch", "auto"])
def test_an_spd_step_creates_nothing_off_the_batch_device(ci_kernel: str, tmp_path: Path) -> None:
    config = api.load_run_config(
        "tms-5-2",
        [
            *TINY_TMS,
            f"method.ci_kernel={ci_kernel}",
            "method.adversarial_steps=1",
            "method.adversarial_recon_coeff=1",
            "method.importance_frequency_coeff=0.1",
            "train.eval_batch_size=128",
        ],
    )
    target = run_target(config.target, tmp_path / "target")
    spd = SPD(target, config.method, seed=0, eval_batch_size=128)
    _steps_on_meta_default(spd, target.sample_inputs)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("sparse-512-relu-l1-resample", ["method.resample_every=1", "method.resample_samples=4096"]),
        ("sparse-512-topk", []),
        ("sparse-512-topk", ["method.activation=batchtopk", "method.aux_k=null"]),
        ("sparse-512-relu-l1", ["method.activation=jumprelu", "method.penalty.name=none"]),
        ("sparse-512-relu-l1", ["method.activation=gated"]),
        ("hierarchy-matryoshka", ["method.init=data"]),
    ],
)
def test_a_dictionary_step_creates_nothing_off_the_batch_device(preset: str, overrides: list[str]) -> None:
    config = api.load_dictionary_config(preset, ["method.width=64", *overrides])
    source = activation_source(config.data)
    method = DictionaryMethod(source, config.method, seed=0, total_steps=4, eval_batch_size=256)
    _steps_on_meta_default(method, source.sample)


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_weights_and_loss_in_fp32(tmp_path: Path) -> None:
    config = api.load_run_config("tms-5-2", TINY_TMS)
    target = run_target(config.target, tmp_path / "target")
    spd = SPD(target, config.method, seed=0)
    batch = target.sample_inputs(BATCH, step_generator(0, "data"))
    device = torch.device("cpu")
    with autocast(device, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        output = spd.training_loss(batch, step_generator(0, "noise"))
    output.loss.float().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in spd.module.parameters())
    fp32 = spd.training_loss(batch, step_generator(0, "noise")).loss
    assert float(output.loss.detach()) == pytest.approx(float(fp32.detach()), rel=0.05)


def test_a_device_that_is_not_here_is_a_config_error() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda, cuda:N or mps"):
        api.load_run_config("tms-5-2", ["train.device=gpu"])
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_where_a_run_executes_leaves_cached_target_keys_unchanged_unless_set() -> None:
    plain = TrainConfig(steps=1, batch_size=2)
    assert plain.digest() == "9c4b67f84449"  # its key as 917aeb7 printed it, before these options
    assert TrainConfig(steps=1, batch_size=2, device="auto", loggers=()).digest() == plain.digest()
    assert TrainConfig(steps=1, batch_size=2, precision="bf16").digest() != plain.digest()


def test_a_bf16_run_trains_and_resumes_like_fp32(tmp_path: Path) -> None:
    config = api.load_run_config("tms-5-2", [*TINY_TMS, "train.precision=bf16"])
    result = api.decompose(config, tmp_path / "bf16")
    fp32 = api.decompose(api.load_run_config("tms-5-2", TINY_TMS), tmp_path / "fp32")
    assert result.metrics["mmcs"] == pytest.approx(fp32.metrics["mmcs"], abs=0.02)
    assert (tmp_path / "bf16" / "checkpoints").is_dir()


def test_dry_run_prints_sites_parameters_and_memory_without_training(tmp_path: Path, capsys) -> None:
    assert cli.main(["decompose", "resid-mlp-1", "--dry-run", "train.precision=bf16"]) == 0
    printed = capsys.readouterr().out
    config = api.load_run_config("resid-mlp-1")
    spd = SPD(untrained_target(config.target), config.method, seed=0)
    learned = sum(p.numel() for p in spd.module.parameters())
    assert f"{learned:,}" in printed and "layers.0.mlp_in" in printed and "C=150, W 50×1000" in printed
    assert "memory per device" in printed and "bf16" in printed
    assert not list(Path(os.environ["UNMERGE_CACHE_DIR"]).glob("targets/resid-mlp-1*"))  # nothing trained
    assert cli.main(["train-dictionary", "sparse-512-topk", "--dry-run", "method.width=1024"]) == 0
    assert "256 → 1,024 latents" in capsys.readouterr().out
    assert cli.main(["decompose", "tms-5-2"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_loggers_receive_the_training_log_scalars_from_rank_0(tmp_path: Path, monkeypatch) -> None:
    """A stand-in wandb module records what the loop sends; TensorBoard is checked when it is installed."""
    logged: list[tuple[int, dict]] = []

    class Run:
        def log(self, scalars: dict, step: int) -> None:
            logged.append((step, scalars))

        def finish(self) -> None:
            logged.append((-1, {}))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **settings: Run()))
    config = api.load_run_config("tms-5-2", [*TINY_TMS, "train.loggers=[wandb]", "train.eval_every=20"])
    api.decompose(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    sent = {step: scalars for step, scalars in logged if "train/loss" in scalars}
    assert [line["step"] for line in lines] == sorted(sent)
    assert all(sent[line["step"]]["train/loss"] == line["loss"] for line in lines)
    assert any("eval/faithfulness" in scalars for _, scalars in logged) and logged[-1] == (-1, {})
    if importlib.util.find_spec("tensorboard") is None:  # not a test dependency: its absence is named
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            api.decompose(api.load_run_config("tms-5-2", [*TINY_TMS, "train.loggers=[tensorboard]"]), tmp_path / "t")


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("sparse-512-relu-l1", []),
        ("sparse-512-topk", []),  # the sparse encode/decode path, with AuxK
        ("sparse-512-topk", ["method.activation=batchtopk", "method.aux_k=null"]),
        ("sparse-512-relu-l1", ["method.activation=jumprelu", "method.penalty.name=none"]),
        ("sparse-512-relu-l1", ["method.activation=gated"]),
        ("hierarchy-matryoshka", []),
        ("resid-mlp-1-transcoder", ["method.skip=true"]),
    ],
)
def test_every_dictionary_steps_in_bf16_with_fp32_weights_and_gradients(preset: str, overrides: list[str]) -> None:
    """Hand-written backward functions run their products in the forward's precision (autograd runs a backward
    without autocast), and the loss agrees with fp32 to bf16's precision."""
    config = api.load_dictionary_config(preset, ["method.width=256", *overrides])
    source = activation_source(config.data)
    losses = {}
    for precision in ("fp32", "bf16"):
        method = DictionaryMethod(source, config.method, seed=0, total_steps=10, eval_batch_size=256)
        method.before_training()
        optimizer = make_optimizer(method.module, OptimConfig())
        for step in range(2):
            batch = source.sample(256, step_generator(0, "data", step))
            output = step_loss(method, batch, step_generator(0, "noise", step), precision)
            apply_gradients(method, optimizer, output.loss)
        assert all(p.dtype == torch.float32 for p in method.module.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in method.module.parameters())
        losses[precision] = float(output.loss.detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_tensorboard_receives_the_training_log_scalars(tmp_path: Path) -> None:
    """Where TensorBoard is installed (not a test dependency), its event file holds train_log.jsonl's losses."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = api.load_run_config("tms-5-2", [*TINY_TMS, "train.loggers=[tensorboard]"])
    api.decompose(config, tmp_path)
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert logged == [(line["step"], pytest.approx(line["loss"], rel=1e-6)) for line in lines]
