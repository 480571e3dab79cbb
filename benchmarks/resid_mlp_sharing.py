"""Where a residual MLP run falls short of issue 22's grouping bar. Per site, on one input per feature: how many
features each live subcomponent is important on (CI > 0.5) and how many subcomponents each feature uses. From the
run's saved grouping (`grouping.json`, written by `unmerge group` or `benchmarks/seeds.py`): the ARI of the
features' units alone (`feature_adjusted_rand_index`; the whole ARI is dominated by the pairs within `W_out`'s one
dense group), the components that mix features' `W_in` units, and the features whose units are split over several
components. One JSON line per run.

    .venv/bin/python benchmarks/resid_mlp_sharing.py runs/bench/resid-seeds/r3-lr4/preset/tpreset-s0 [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from unmerge import api
from unmerge.analysis.grouping import load_grouping
from unmerge.metrics import alive_count

IMPORTANT = 0.5


def counts(values: Iterable[int]) -> dict[int, int]:
    """How many of `values` take each value, in increasing order of the value."""
    return dict(sorted(Counter(values).items()))


def sharing(one_hot_ci: Tensor) -> dict[str, object]:
    """For one site's (features, C) one-hot CI: live subcomponents (CI > 0.1 on some feature), the live ones by how
    many features they are important on, and the features by how many subcomponents they use."""
    important = one_hot_ci > IMPORTANT
    live = (one_hot_ci > 0.1).any(0)
    return {
        "live": alive_count(one_hot_ci),
        "subcomponents_by_features": counts(important.sum(0)[live].tolist()),
        "features_by_subcomponents": counts(important.sum(1).tolist()),
    }


def grouping_errors(components: list[list[str]], feature_of: dict[str, int]) -> dict[str, object]:
    """How a grouping treats the units in `feature_of` (unit → its feature): the components holding them, those
    that mix features, and the features by how many components hold their units."""
    component_of = {unit: i for i, members in enumerate(components) for unit in members if unit in feature_of}
    units = list(component_of)
    held: dict[int, set[int]] = {}  # component → the features of its units
    spread: dict[int, set[int]] = {}  # feature → the components holding its units
    for unit in units:
        held.setdefault(component_of[unit], set()).add(feature_of[unit])
        spread.setdefault(feature_of[unit], set()).add(component_of[unit])
    return {
        "units": len(units),
        "components": len(held),
        "mixed_components": sum(len(features) > 1 for features in held.values()),
        "features_by_components": counts(len(holders) for holders in spread.values()),
    }


def report(run_dir: Path) -> dict[str, object]:
    _, spd, step = api.load_spd_run(run_dir)
    one_hot = spd.one_hot_importance()
    feature_of = {
        f"{site}/{c}": feature
        for site, ci in one_hot.items()
        if site.endswith("mlp_in")
        for c, feature in enumerate(ci.argmax(0).tolist())
    }
    saved = load_grouping(run_dir)
    w_in = {"ari": saved.get("feature_adjusted_rand_index"), **grouping_errors(saved["components"], feature_of)}
    return {"run": str(run_dir), "step": step, "sites": {s: sharing(ci) for s, ci in one_hot.items()}, "W_in": w_in}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    torch.set_num_threads(1)
    for run_dir in parser.parse_args().runs:
        print(json.dumps(report(run_dir)))


if __name__ == "__main__":
    main()
