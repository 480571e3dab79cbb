"""Long work shows progress where stderr is a log file (nohup, a batch job), not only on a terminal."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import std

from tests.conftest import TINY_TMS
from unmerge import api
from unmerge.train import progress


def test_a_run_logging_to_a_file_prints_its_progress_as_plain_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line per step instead of a line a minute
    api.decompose(api.load_run_config("tms-5-2", [*TINY_TMS, "train.steps=20"]), tmp_path / "run")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spd tms-5-2")]
    assert lines, "no progress line"
    assert "20/20" in lines[-1]
    assert not any("\r" in line for line in lines)  # each redraw its own line, nothing a file cannot show


def test_work_ending_within_the_interval_prints_nothing_to_a_log_file(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in progress.progress_bar(range(3), desc="quick", total=3):
        pass
    assert "quick" not in capsys.readouterr().err


def test_a_loop_that_slows_down_prints_its_current_count_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """1,000 steps of 0.1 s, then ten of 100 s: a line as each slow step ends, showing the steps done by then."""
    now = [0.0]
    monkeypatch.setattr(std, "time", lambda: now[0])  # tqdm's clock
    bar = progress.progress_bar(range(1010), desc="slowing [a bracket in the name]", total=1010)
    for step in bar:
        now[0] += 0.1 if step < 1000 else 100.0
    counts = [int(re.search(r"(\d+)/1010", line)[1]) for line in capsys.readouterr().err.splitlines()]
    assert counts == [600, *range(1001, 1011)]  # the first minute, then each slow step; no count twice
    assert type(bar).monitor_interval == 0  # no monitor thread redrawing a stale count


def test_a_notebook_gets_the_live_bar_not_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", SimpleNamespace(get_ipython=lambda: kernel))
    with progress.progress_bar(range(3), total=3) as bar:
        assert bar.mininterval == 0.5
    monkeypatch.setitem(sys.modules, "IPython", SimpleNamespace(get_ipython=lambda: None))  # IPython, no kernel
    with progress.progress_bar(range(3), total=3) as bar:
        assert bar.mininterval == progress.LOG_INTERVAL_S
