"""`benchmarks/seeds.py`'s seed lists, as its `--seeds` and `--target-seeds` options read them."""

from __future__ import annotations

import pytest
from seeds import seed_range


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("3", [3]), ("0-4", [0, 1, 2, 3, 4]), ("1,4,7", [1, 4, 7]), ("0-2,4,6-7", [0, 1, 2, 4, 6, 7])],
)
def test_seed_range_reads_ranges_lists_and_both(text: str, seeds: list[int]) -> None:
    assert seed_range(text) == seeds


def test_seed_range_refuses_what_is_not_a_seed() -> None:
    with pytest.raises(ValueError):
        seed_range("x")
