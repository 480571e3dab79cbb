"""The learning-rate schedules, by hand: warm-up, half-period cosine, quarter-period cosine (the APD reference's),
linear (the APD reference's for its TMS targets)."""

from __future__ import annotations

import math
from typing import get_args

import pytest

from unmerge.config import OptimConfig
from unmerge.train.schedule import DECAYS, learning_rate


@pytest.mark.parametrize(
    ("schedule", "halfway", "end"),
    [("constant", 1.0, 1.0), ("cosine", 0.5, 0.0), ("quarter_cosine", math.sqrt(0.5), 0.0), ("linear", 0.5, 0.0)],
)
def test_each_schedule_after_a_linear_warm_up(schedule: str, halfway: float, end: float) -> None:
    optim = OptimConfig(lr=2.0, schedule=schedule, warmup_steps=10)
    assert learning_rate(optim, 0, 110) == pytest.approx(0.2)  # (step + 1) / 10 of the peak
    assert learning_rate(optim, 9, 110) == pytest.approx(2.0)
    assert learning_rate(optim, 10, 110) == pytest.approx(2.0)
    assert learning_rate(optim, 60, 110) == pytest.approx(2.0 * halfway)  # 50 of the 100 decay steps
    assert learning_rate(optim, 110, 110) == pytest.approx(2.0 * end, abs=1e-12)


def test_the_quarter_cosine_decays_to_its_floor() -> None:
    optim = OptimConfig(lr=1.0, schedule="quarter_cosine", final_lr_fraction=0.1)
    assert learning_rate(optim, 50, 100) == pytest.approx(0.1 + 0.9 * math.sqrt(0.5))
    assert learning_rate(optim, 100, 100) == pytest.approx(0.1)


def test_the_linear_decay_to_its_floor() -> None:
    optim = OptimConfig(lr=1.0, schedule="linear", final_lr_fraction=0.1)
    assert learning_rate(optim, 25, 100) == pytest.approx(0.1 + 0.9 * 0.75)
    assert learning_rate(optim, 100, 100) == pytest.approx(0.1)


def test_every_schedule_the_config_accepts_has_a_decay() -> None:
    """The config's names (a Literal, so a typo is a config error) and the decays are defined apart."""
    accepted = set(get_args(OptimConfig.model_fields["schedule"].annotation))
    assert accepted == {"constant", *DECAYS}
