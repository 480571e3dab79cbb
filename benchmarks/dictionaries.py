"""Dictionary quality on sparse features with known ground truth (issue #3, criterion a): train each
activation × penalty × strength configuration and print one JSON line of its metrics.

    .venv/bin/python benchmarks/dictionaries.py                        # the default grid, 20k steps each
    .venv/bin/python benchmarks/dictionaries.py --steps 5000 --only topk

Runs go to `runs/bench-dict/<name>` (rerunning resumes or re-evaluates).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unmerge import api

GRID: dict[str, list[list[str]]] = {
    "relu-l1": [["method.penalty.coeff=" + c] for c in ("0.03", "0.1", "0.2", "0.3")],
    "relu-l1-data": [["method.init=data", "method.penalty.coeff=" + c] for c in ("0.03", "0.1", "0.2", "0.3")],
    "topk": [["method.k=" + k] for k in ("4", "5", "6", "8")],
    "topk-data": [["method.init=data", "method.k=" + k] for k in ("4", "5", "6", "8")],
}
PRESETS = {"relu-l1": "sparse-512-relu-l1", "relu-l1-data": "sparse-512-relu-l1", "topk": "sparse-512-topk",
           "topk-data": "sparse-512-topk"}
REPORTED = ("recall_mmcs", "matched/0.9", "mcc", "precision_mmcs", "l0", "fvu", "dead_latents", "duplicate_latents",
            "shrinkage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--only", nargs="*", default=list(GRID), choices=list(GRID))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dict"))
    args = parser.parse_args()
    for family in args.only:
        for overrides in GRID[family]:
            settings = [*overrides, f"train.steps={args.steps}", "train.threads=1"]
            config = api.load_dictionary_config(PRESETS[family], settings)
            name = family + "-" + "-".join(o.split("=")[1] for o in overrides if not o.startswith("method.init"))
            start = time.perf_counter()
            result = api.train_dictionary(config, args.out / name)
            metrics = {key: round(result.metrics[key], 4) for key in REPORTED}
            print(json.dumps({"run": name, "steps": args.steps, "wall_s": round(time.perf_counter() - start, 1),
                              **metrics}), flush=True)


if __name__ == "__main__":
    main()
