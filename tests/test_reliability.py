"""Issue 23's cases, one test each: what a user types gets one clear error (never a traceback, never silently
accepted), and no run directory is left in a state that blocks or misleads the next run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.conftest import TINY_TMS, poison_loss_after
from unmerge import api, runs
from unmerge.cli import main
from unmerge.config import RunConfig
from unmerge.errors import ConfigError
from unmerge.io import PARTIAL_MARK
from unmerge.spd.method import SPD
from unmerge.targets.toys import cached_target
from unmerge.train import checkpoint


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expecting it to refuse with one error line and no traceback; what it printed on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err  # warnings may come before it
    return err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=true", r"steps: a boolean \(True\) is not valid here"),
        ("method.sites.0.C=false", r"C: a boolean \(False\) is not valid here"),
        ("train.seed=9223372036854775808", r"train\.seed: Input should be less than 9223372036854775808"),
        ("train.optim.lr=.nan", r"train\.optim\.lr: Input should be a finite number"),
        ("train.optim.weight_decay=.inf", r"train\.optim\.weight_decay: Input should be a finite number"),
        ("method.importance_minimality_coeff=-.inf", r"importance_minimality_coeff: Input should be a finite number"),
        ("method.sites.1={pattern: linear1, C: 3}", r"the site pattern\(s\) 'linear1' are listed more than once"),
    ],
)
def test_values_that_were_silently_accepted_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        api.load_run_config("tms-5-2", [override])


def test_a_key_given_twice_in_a_yaml_mapping_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text("name: x\ntrain:\n  steps: 5\n  steps: 6\n")
    assert "the key 'steps' is given twice in one mapping" in _error(capsys, ["decompose", str(config)])
    assert "given twice" in _error(capsys, ["decompose", "tms-5-2", "train.optim={lr: 1, lr: 2}"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00garbage\x80", "is not a UTF-8 text file"),
        (b"{{{ not: [yaml", "is not valid YAML"),
        (b"- a list\n- not a mapping\n", "must hold a mapping of config keys"),
    ],
)
def test_a_config_file_that_is_not_yaml_text_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    assert message in _error(capsys, ["decompose", str(config)])
    assert "is a directory" in _error(capsys, ["decompose", str(tmp_path)])


def test_group_refuses_a_negative_alpha_before_loading_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "alpha -1.0 must be a finite number ≥ 0" in _error(capsys, ["group", str(tmp_path), "--alpha", "-1"])
    assert "threshold 1.5 must lie in [0, 1)" in _error(capsys, ["group", str(tmp_path), "--threshold", "1.5"])


@pytest.fixture(scope="module")
def finished_spd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny SPD run (TMS 5-2, 60 steps, checkpoints at 40 and 60), never changed: tests copy it."""
    run_dir = tmp_path_factory.mktemp("finished") / "spd"
    api.decompose(api.load_run_config("tms-5-2", TINY_TMS), run_dir)
    return run_dir


@pytest.fixture
def spd_copy(finished_spd: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "spd"
    shutil.copytree(finished_spd, copy)
    return copy


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): _sha(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_advice_printed_on_a_nan_works_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poison_loss_after(monkeypatch, 30)
    argv = ["decompose", "tms-5-2", "--out", str(tmp_path), *TINY_TMS]
    advice = _error(capsys, argv)
    lowered = re.search(r"train\.optim\.lr=\S+", advice)
    assert lowered and "resumes from that checkpoint" in advice
    monkeypatch.undo()
    assert main([*argv, lowered.group(0)]) == 0
    assert "resuming from step 20 with train.optim.lr: 0.01 → 0.001" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / runs.TRAIN_LOG).read_text().splitlines()]
    assert {"step": 20, "config_changed": ["train.optim.lr: 0.01 → 0.001"]} in log and log[-1]["step"] == 60
    assert runs.saved_config(tmp_path, RunConfig).train.optim.lr == 0.001
    assert "different config (train.steps: 60 → 80)" in _error(capsys, [*argv, "train.steps=80"])


def test_a_run_that_failed_before_its_first_checkpoint_takes_the_corrected_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["decompose", "tms-5-2", "--out", str(tmp_path), *TINY_TMS]
    assert "matches no" in _error(capsys, [*argv, "method.sites.0.pattern=linear9"])
    assert "out of memory: this run needs about" in _error(capsys, [*argv, "train.eval_batch_size=10000000000000"])
    assert (tmp_path / runs.RUN_CONFIG).is_file()  # what the failed attempts left
    assert main(argv) == 0
    assert runs.saved_config(tmp_path, RunConfig) == api.load_run_config("tms-5-2", TINY_TMS)


def _newest_and_older(run_dir: Path) -> tuple[Path, Path]:
    *_, older, newest = runs.saved_steps(run_dir)
    return newest, older


CORRUPTIONS = {
    "state.json not UTF-8": lambda c: (c / checkpoint.STATE_FILE).write_bytes(b"\xff\xfe\x80"),
    "state.json not JSON": lambda c: (c / checkpoint.STATE_FILE).write_text("{step: 60"),
    "state.json a list": lambda c: (c / checkpoint.STATE_FILE).write_text("[60]"),
    "state.json without its step": lambda c: (c / checkpoint.STATE_FILE).write_text('{"weights_sha256": "00"}'),
    "state.json's step not its folder's": lambda c: (c / checkpoint.STATE_FILE).write_text(
        json.dumps({**json.loads((c / checkpoint.STATE_FILE).read_text()), "step": 37})
    ),
    "weights truncated": lambda c: (c / checkpoint.WEIGHTS_FILE).write_bytes(b"\x00" * 9),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_checkpoint_is_skipped_naming_it_and_never_loaded(
    spd_copy: Path, capsys: pytest.CaptureFixture[str], corrupt: Callable[[Path], object]
) -> None:
    newest, older = _newest_and_older(spd_copy)
    corrupt(newest)
    capsys.readouterr()
    assert api.evaluate(spd_copy).resumed_from == 40
    assert f"skipping a damaged checkpoint: checkpoint {newest}" in capsys.readouterr().err
    corrupt(older)
    before = _snapshot(spd_copy)
    assert "every checkpoint of" in _error(capsys, ["evaluate", str(spd_copy)])
    assert _snapshot(spd_copy) == before


def test_an_interrupted_writes_leftovers_are_cleaned_on_the_next_start(
    spd_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    staging = spd_copy / runs.CHECKPOINT_DIR / f"{runs.STAGING_PREFIX}abc123"
    staging.mkdir()
    (staging / checkpoint.WEIGHTS_FILE).write_bytes(b"half")
    partial = spd_copy / f".{runs.METRICS_FILE}{PARTIAL_MARK}x1y2"
    partial.write_text("{")
    assert main(["decompose", "tms-5-2", "--out", str(spd_copy), *TINY_TMS]) == 0
    assert not staging.exists() and not partial.exists()
    assert not (spd_copy / runs.LOCK_FILE).exists()


def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(
    spd_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = spd_copy / runs.LOCK_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid} {socket.gethostname()}")
        before = _snapshot(spd_copy)
        message = _error(capsys, ["decompose", "tms-5-2", "--out", str(spd_copy), *TINY_TMS])
        assert f"is being written by process {sleeper.pid}" in message
        assert "evaluate" and f"process {sleeper.pid}" in _error(capsys, ["evaluate", str(spd_copy)])
        assert _snapshot(spd_copy) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["evaluate", str(spd_copy)]) == 0
    assert f"took over the lock of process {sleeper.pid}, which no longer runs" in capsys.readouterr().err
    lock.write_text("not a lock")
    assert "is being claimed by another process" in _error(capsys, ["evaluate", str(spd_copy)])  # just written
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert main(["evaluate", str(spd_copy)]) == 0 and not lock.exists()  # an old unreadable lock is stale


def test_commands_on_the_wrong_kind_of_run_say_so(spd_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _error(capsys, ["export-saelens", str(spd_copy), "--out", str(spd_copy.parent / "sae")])
    assert "holds an SPD run (`decompose`), but this needs a dictionary run (`train-dictionary`)" in message
    dictionary = spd_copy.parent / "dictionary"
    dictionary.mkdir()
    (dictionary / runs.RUN_CONFIG).write_text("name: d\ndata: {kind: sparse_features}\n")
    assert "holds a dictionary run (`train-dictionary`), but this needs an SPD run" in _error(
        capsys, ["group", str(dictionary)]
    )


def test_out_that_is_a_file_or_under_one_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, problem in [(afile, "is a file"), (afile / "sub", f"lies under {afile}, which is a file")]:
        assert problem in _error(capsys, ["decompose", "tms-5-2", "--out", str(out), *TINY_TMS])
        assert "--out must be a directory path" in _error(
            capsys, ["train-target", "tms-5-2", "--out", str(out), "target.train.steps=300"]
        )
    assert afile.read_text() == "x"


def test_report_on_a_malformed_metrics_json_and_evaluate_without_one(
    spd_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = spd_copy / runs.METRICS_FILE
    for content, problem in [("{oops", "is not valid JSON"), ("[1, 2]", "holds a JSON list"), ('{"a": "b"}', "'a'")]:
        metrics.write_text(content)
        message = _error(capsys, ["report", str(spd_copy), "--out", str(tmp_path / "index")])
        assert problem in message and "unmerge evaluate" in message
    metrics.unlink()
    assert main(["evaluate", str(spd_copy)]) == 0 and metrics.is_file()  # SPD: evaluate rewrites it


def test_a_full_disk_while_checkpointing_is_one_error_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    saves = []

    def full_after_one(tensors: dict, path: str, *args: object, **kwargs: object) -> None:
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        save_file(tensors, path, *args, **kwargs)

    cached_target(api.load_run_config("tms-5-2", TINY_TMS).target)  # trained (and checkpointed) beforehand
    monkeypatch.setattr(checkpoint, "save_file", full_after_one)
    argv = ["decompose", "tms-5-2", "--out", str(tmp_path), *TINY_TMS]
    assert "no space left for" in _error(capsys, argv)
    assert [p.name for p in runs.saved_steps(tmp_path)] == ["step-0000020"]
    assert not list((tmp_path / runs.CHECKPOINT_DIR).glob(f"{runs.STAGING_PREFIX}*"))
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert main(argv) == 0 and "resumed from step 20" in capsys.readouterr().out


def test_an_allocator_failure_during_training_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(SPD, "training_loss", no_memory)
    message = _error(capsys, ["decompose", "tms-5-2", "--out", str(tmp_path), *TINY_TMS])
    assert "out of memory" in message and "lower train.batch_size" in message


def test_a_half_written_log_line_is_dropped_with_a_warning_on_resume(
    spd_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = spd_copy / runs.TRAIN_LOG
    log.write_text(log.read_text() + '{"step": 61, "loss": 0.0')  # a killed process's last, unfinished line
    assert main(["decompose", "tms-5-2", "--out", str(spd_copy), *TINY_TMS]) == 0
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    assert all(json.loads(line)["step"] <= 60 for line in log.read_text().splitlines())


@pytest.fixture
def dictionary_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "dictionary"
    config = api.load_dictionary_config("hierarchy-relu-l1", ["train.steps=20", "train.eval_batch_size=512"])
    api.train_dictionary(config, run_dir)
    return run_dir


def test_a_dictionary_run_without_metrics_and_exports_onto_a_file_are_one_error(
    dictionary_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "sae.txt"
    afile.write_text("x")
    assert "--out must be a directory path" in _error(
        capsys, ["export-saelens", str(dictionary_run), "--out", str(afile)]
    )
    (dictionary_run / runs.METRICS_FILE).unlink()
    assert "has no metrics.json" in _error(capsys, ["evaluate", str(dictionary_run)])
    assert afile.read_text() == "x"


@pytest.mark.parametrize(
    ("command", "override"),
    [
        (["decompose", "tms-5-2"], "method.sites=[{pattern: linear1, C: 10000000000000}]"),
        (["decompose", "tms-5-2"], "train.batch_size=10000000000000"),
        (["train-dictionary", "hierarchy-relu-l1"], "method.width=10000000000000"),
    ],
)
def test_a_run_too_large_for_the_memory_is_refused_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], override: str
) -> None:
    message = _error(capsys, [*command, "--out", str(tmp_path / "run"), override])
    assert "out of memory: this run needs about" in message and "TiB" in message and "--dry-run" in message


def test_an_out_directory_that_is_not_writable_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runs.os, "access", lambda path, mode: False)  # root may write anywhere: ask as a user
    assert f"{tmp_path} is not writable" in _error(capsys, ["decompose", "tms-5-2", "--out", str(tmp_path / "run")])


def test_a_full_disk_while_logging_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(path: Path, record: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("unmerge.train.loop._append_jsonl", full)
    message = _error(capsys, ["decompose", "tms-5-2", "--out", str(tmp_path), *TINY_TMS])
    assert re.search(r"no space left for \S+/train_log.jsonl", message) and "rerun the same command" in message


def test_starting_afresh_removes_only_what_a_run_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["decompose", "tms-5-2", "--out", str(tmp_path), *TINY_TMS]
    assert "matches no" in _error(capsys, [*argv, "method.sites.0.pattern=linear9"])
    (tmp_path / "notes.txt").write_text("mine")
    assert "is not a run directory" in _error(capsys, argv)
    assert (tmp_path / "notes.txt").read_text() == "mine"
