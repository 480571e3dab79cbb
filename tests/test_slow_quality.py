"""Full preset runs against ground truth (minutes to hours each): `pytest -m slow tests/test_slow_quality.py`.

Deselected by default; `benchmarks/quality.py` runs the same check over seeds and records results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.quality import check
from unmerge import api


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", ["tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1", "resid-mlp-2", "resid-mlp-3"]
)
def test_preset_recovers_the_ground_truth(preset: str, tmp_path: Path) -> None:
    config = api.load_run_config(preset)
    result = api.decompose(config, tmp_path)
    verdict = check(config, result.metrics)
    assert verdict["pass"], {**verdict, **{k: result.metrics[k] for k in ("ci_pattern_errors",)}}
