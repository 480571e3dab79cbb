"""`benchmarks/seeds.py`'s seed lists, as its `--seeds` and `--target-seeds` options read them."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from seeds import outcome, seed_range


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("3", [3]), ("0-4", [0, 1, 2, 3, 4]), ("1,4,7", [1, 4, 7]), ("0-2,4,6-7", [0, 1, 2, 4, 6, 7])],
)
def test_seed_range_reads_ranges_lists_and_both(text: str, seeds: list[int]) -> None:
    assert seed_range(text) == seeds


def test_seed_range_refuses_what_is_not_a_seed() -> None:
    with pytest.raises(ValueError):
        seed_range("x")


def test_a_run_that_fails_is_counted_as_a_failure_naming_its_error() -> None:
    done, broken = Future(), Future()
    done.set_result({"pass": True, "wall_s": 3.0})
    broken.set_exception(KeyError("ci_pattern_errors/W_in"))
    assert outcome(done) == {"pass": True, "wall_s": 3.0}
    assert outcome(broken) == {"pass": False, "error": "KeyError: 'ci_pattern_errors/W_in'", "wall_s": None}
