"""Decomposition quality against ground truth (issue #2, criteria b and c): run presets over seeds and check
MMCS, ML2R, the number of live subcomponents per site and the one-hot CI pattern errors.

    .venv/bin/python benchmarks/quality.py tms-5-2 tms-5-2-id --seeds 0 1 2
    .venv/bin/python benchmarks/quality.py resid-mlp-1 --seeds 0 --set train.steps=20000

Runs go to `runs/bench/<preset>-s<seed>` (rerunning resumes or re-evaluates). Prints one JSON line per run with
`pass` telling whether every criterion holds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unmerge import api
from unmerge.config import RunConfig, TMSConfig


def expected_alive(config: RunConfig) -> dict[str, int]:
    """Live subcomponents the ground truth calls for, per group of sites."""
    target = config.target
    if isinstance(target, TMSConfig):
        expected = {"linear1": target.n_features, "linear2": target.n_features}
        if target.identity:
            expected["hidden"] = target.n_hidden
        return expected
    return {"W_in": target.n_features, "W_out": target.d_mlp * target.n_layers}


def check(config: RunConfig, metrics: dict[str, float]) -> dict[str, object]:
    """The criteria of issue #2 for this preset."""
    alive = {
        "linear1": metrics.get("alive/linear1"),
        "linear2": metrics.get("alive/linear2"),
        "hidden": metrics.get("alive/hidden"),
        "W_in": sum(v for k, v in metrics.items() if k.startswith("alive/") and k.endswith("mlp_in")),
        "W_out": sum(v for k, v in metrics.items() if k.startswith("alive/") and k.endswith("mlp_out")),
    }
    expected = expected_alive(config)
    alive_ok = all(alive[group] == count for group, count in expected.items())
    ok = alive_ok and metrics["ci_pattern_errors"] == 0
    if isinstance(config.target, TMSConfig):
        ok = ok and metrics["mmcs"] >= 0.999 and 0.98 <= metrics["ml2r"] <= 1.04
    return {"alive": {g: alive[g] for g in expected}, "expected_alive": expected, "pass": bool(ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    for preset in args.presets:
        for seed in args.seeds:
            config = api.load_run_config(preset, [*args.set, f"train.seed={seed}"])
            start = time.perf_counter()
            result = api.decompose(config, args.out / f"{preset}-s{seed}")
            headline = {
                k: round(v, 5)
                for k, v in result.metrics.items()
                if k in ("mmcs", "ml2r", "matrix_cosine", "ci_pattern_errors")
            }
            print(
                json.dumps(
                    {
                        "benchmark": "spd_quality",
                        "preset": preset,
                        "seed": seed,
                        "steps": config.train.steps,
                        "wall_s": round(time.perf_counter() - start, 1),
                        "resumed_from": result.resumed_from,
                        **headline,
                        **check(config, result.metrics),
                        "overrides": args.set,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
