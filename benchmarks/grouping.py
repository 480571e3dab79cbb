"""Grouping against known mechanisms (issue #5, criterion a): run `unmerge group` on finished toy runs, at one or
more α, and score the chosen grouping by the adjusted Rand index against the ground truth, plus whether each known
dense mechanism (residual MLP `W_out`, TMS identity) came out as one component of its own.

    .venv/bin/python benchmarks/grouping.py runs/bench/tms-5-2-id-s0 runs/bench/resid-mlp-1-s0 --alpha 2 8 32

Prints one JSON line per (run, α). The runs come from `benchmarks/quality.py`. `grouping.json` in each run is
left holding the last α's grouping.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unmerge import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--alpha", nargs="+", type=float, default=[api.DEFAULT_ALPHA])
    parser.add_argument("--inputs", type=int, default=16_384)
    args = parser.parse_args()
    for run in args.runs:
        for alpha in args.alpha:
            start = time.perf_counter()
            grouping = api.group_components(run, args.inputs, alpha=alpha)
            summary = grouping.summary()
            print(
                json.dumps(
                    {
                        "run": str(run),
                        "alpha": alpha,
                        "active_units": summary["active_units"],
                        "components": summary["n_components"],
                        "largest": [len(c) for c in grouping.components()[:5]],
                        "ari": summary["adjusted_rand_index"],
                        "dense": summary["dense_mechanisms"],
                        "bits_per_input": round(summary["description_length_bits"], 4),
                        "bits_unmerged": round(summary["description_length_unmerged_bits"], 4),
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
