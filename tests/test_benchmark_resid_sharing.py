"""`benchmarks/resid_mlp_sharing.py`'s counts of shared subcomponents and of grouping errors, by hand."""

from __future__ import annotations

import torch
from resid_mlp_sharing import grouping_errors, sharing


def test_sharing_counts_live_subcomponents_by_features_and_features_by_subcomponents() -> None:
    """Subcomponent 0 serves features 0 and 1, 1 serves feature 2, 2 is live but never important (0.3), 3 is dead
    (0.05); feature 3 uses none."""
    ci = torch.tensor(
        [
            [0.9, 0.0, 0.0, 0.05],
            [0.8, 0.0, 0.3, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert sharing(ci) == {
        "live": 3,
        "subcomponents_by_features": {0: 1, 1: 1, 2: 1},
        "features_by_subcomponents": {0: 1, 1: 3},
    }


def test_grouping_errors_count_mixed_components_and_split_features() -> None:
    """Feature 0's units a, b are together; feature 1's c sits with feature 2's d (one mixed component) and its e
    alone (feature 1 split over two components); W_out's units are not counted."""
    components = [["a", "b", "w1", "w2"], ["c", "d"], ["e"]]
    feature_of = {"a": 0, "b": 0, "c": 1, "d": 2, "e": 1}
    assert grouping_errors(components, feature_of) == {
        "units": 5,
        "components": 3,
        "mixed_components": 1,
        "features_by_components": {1: 2, 2: 1},
    }
