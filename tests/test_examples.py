"""Every script in `examples/` runs (issue 25), on tiny settings: each takes `--steps` and returns what it built."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

import unmerge

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_an_example_runs(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "20"])
    metrics = result.final_metrics
    assert all(math.isfinite(value) for value in metrics.values())
    if isinstance(result, unmerge.Decomposition):
        assert result.step == 20 and metrics["alive"] > 0 and metrics["faithfulness_relative"] < 1.0
    else:
        assert isinstance(result, unmerge.Dictionary) and metrics["l0"] > 0 and metrics["fvu"] < 1.0
    assert repr(result) in capsys.readouterr().out  # the script shows what it built
