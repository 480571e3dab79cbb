"""Full preset runs against ground truth (minutes to hours each): `pytest -m slow tests/test_slow_quality.py`.

Deselected by default. Each run is judged by the bar `benchmarks/seeds.py` applies over seeds (issue 22's:
`run_checks`), so a preset passes here exactly when its row in BENCHMARKS.md counts it as a pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from seeds import run_checks

from unmerge import api


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", ["tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1", "resid-mlp-2", "resid-mlp-3"]
)
def test_preset_recovers_the_ground_truth(preset: str, tmp_path: Path) -> None:
    config = api.load_run_config(preset)
    result = api.decompose(config, tmp_path)
    verdict = run_checks(config, result.metrics, tmp_path)
    assert verdict["pass"], verdict
