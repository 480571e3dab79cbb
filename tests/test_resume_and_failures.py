"""Checkpoints and resume (bitwise identical after SIGKILL), NaN losses and corrupt checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_TMS, poison_loss_after
from unmerge import api, runs
from unmerge.errors import CheckpointError, NonFiniteLossError
from unmerge.train import checkpoint


def _decompose_command(out: Path, steps: int) -> list[str]:
    overrides = [o for o in TINY_TMS if not o.startswith("train.steps")]
    return [
        sys.executable,
        "-m",
        "unmerge.cli",
        "decompose",
        "tms-5-2-id",
        "--out",
        str(out),
        "--steps",
        str(steps),
        *overrides,
        "train.threads=1",
    ]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(runs.saved_steps(run_dir)[-1] / checkpoint.WEIGHTS_FILE))


def test_sigkill_midway_then_rerun_is_bitwise_identical(tmp_path: Path) -> None:
    steps = 400
    subprocess.run(_decompose_command(tmp_path / "whole", steps), check=True, capture_output=True)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        _decompose_command(interrupted, steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        int(d.name.split("-")[1]) >= 100 for d in runs.saved_steps(interrupted)
    ):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = int(runs.saved_steps(interrupted)[-1].name.split("-")[1])
    assert 100 <= killed_at < steps, "the run was not interrupted midway"
    rerun = subprocess.run(_decompose_command(interrupted, steps), check=True, capture_output=True, text=True)
    assert f"resumed from step {killed_at}" in rerun.stdout
    whole, resumed = _final_weights(tmp_path / "whole"), _final_weights(interrupted)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert (tmp_path / "whole" / "metrics.json").read_text() == (interrupted / "metrics.json").read_text()
    assert (tmp_path / "whole" / "train_log.jsonl").read_text() == (interrupted / "train_log.jsonl").read_text()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    poison_loss_after(monkeypatch, 30)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 30 .*checkpoint is untouched"):
        api.decompose(api.load_run_config("tms-5-2", TINY_TMS), tmp_path)
    saved = runs.saved_steps(tmp_path)
    assert [d.name for d in saved] == ["step-0000020"]
    checkpoint.load_checkpoint(saved[-1])  # intact: its checksum verifies
    before = {p.name: _sha(p) for p in saved[-1].iterdir()}
    with pytest.raises(CheckpointError, match="different config"):
        api.decompose(api.load_run_config("tms-5-2", [*TINY_TMS, "train.steps=80"]), tmp_path)
    assert {p.name: _sha(p) for p in saved[-1].iterdir()} == before


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_and_never_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.decompose(api.load_run_config("tms-5-2", TINY_TMS), tmp_path)
    *older, newest = runs.saved_steps(tmp_path)
    weights = newest / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    capsys.readouterr()
    assert api.evaluate(tmp_path).resumed_from == int(older[-1].name.removeprefix("step-"))
    assert f"skipping a damaged checkpoint: checkpoint {newest} is corrupt" in capsys.readouterr().err
    for path in older:
        (path / checkpoint.STATE_FILE).write_text("[]")
    with pytest.raises(CheckpointError, match=r"every checkpoint of .* is damaged .*delete .*checkpoints"):
        api.evaluate(tmp_path)


def test_atomic_writes_get_ordinary_file_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from unmerge.io import write_atomic

    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.html", lambda path: path.write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644


def _as_format_1(checkpoint_dir: Path, order: list[str]) -> None:
    """Rewrite a checkpoint of TMS 5-2+ID in the layout written before the site records (format 1): components
    under `components.<site>.U`, CI functions under `ci.functions.<site>.w1`, optimiser state by position in the
    old parameter order `order`, no `format` in state.json."""
    weights = checkpoint_dir / checkpoint.WEIGHTS_FILE
    tensors = load_file(str(weights))

    def old_name(name: str) -> str:
        site, part, leaf = name.split(".")
        return f"components.{site}.{leaf}" if part == "components" else f"ci.functions.{site}.{leaf}"

    legacy = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            parameter, state = key.removeprefix("optimizer.").rsplit(".", 1)
            legacy[f"optimizer.{order.index(old_name(parameter))}.{state}"] = value
        else:
            legacy[old_name(key)] = value
    save_file(legacy, str(weights))
    state = json.loads((checkpoint_dir / checkpoint.STATE_FILE).read_text())
    del state["format"]
    state["weights_sha256"] = _sha(weights)
    (checkpoint_dir / checkpoint.STATE_FILE).write_text(json.dumps(state))


def test_a_checkpoint_written_before_the_site_records_resumes_to_the_same_result(tmp_path: Path) -> None:
    config = api.load_run_config("tms-5-2-id", TINY_TMS)
    api.decompose(config, tmp_path / "whole")
    api.decompose(config, tmp_path / "legacy")
    for late in runs.saved_steps(tmp_path / "legacy")[1:]:
        shutil.rmtree(late)
    (tmp_path / "legacy" / "metrics.json").unlink()
    sites = ["linear1", "hidden"]  # linear2 is tied to linear1: no components of its own
    order = [f"components.{s}.{p}" for s in sites for p in ("U", "V")]
    order += [f"ci.functions.{s}.{p}" for s in ("linear1", "hidden", "linear2") for p in ("w1", "b1", "w2", "b2")]
    _as_format_1(runs.saved_steps(tmp_path / "legacy")[-1], order)
    result = api.decompose(config, tmp_path / "legacy")
    assert result.resumed_from == 40
    whole, resumed = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "legacy")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert (tmp_path / "whole" / "metrics.json").read_text() == (tmp_path / "legacy" / "metrics.json").read_text()


@pytest.mark.parametrize(
    "variant",
    [
        ["method.pnorm=2", "method.pnorm_final=0.4"],
        ["method.adversarial_persistent=true", "method.adversarial_steps=1", "method.adversarial_recon_coeff=1"],
    ],
    ids=["annealed p", "persistent adversarial masks"],
)
def test_a_variant_with_state_across_steps_resumes_to_the_same_bytes(tmp_path: Path, variant: list[str]) -> None:
    """p follows the step the loop is at and the kept worst-case r is checkpointed, so a run resumed mid-way ends
    as the uninterrupted one."""
    config = api.load_run_config("tms-5-2", [*TINY_TMS, *variant])
    api.decompose(config, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(runs.saved_steps(tmp_path / "resumed")[-1])
    (tmp_path / "resumed" / "metrics.json").unlink()
    assert api.decompose(config, tmp_path / "resumed").resumed_from == 40
    whole, resumed = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], value) for name, value in whole.items())
