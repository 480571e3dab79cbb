"""APD against SPD on the same targets (issue 22, point 1): each pair of presets over seeds in parallel processes,
with the metrics evaluated every `--eval-every` steps, and one markdown table row per run.

    .venv/bin/python benchmarks/apd_vs_spd.py --seeds 0-2 --workers 2 --out runs/bench/apd-vs-spd
    .venv/bin/python benchmarks/apd_vs_spd.py --pairs apd-tms-5-2-id:tms-5-2-id --seeds 0

Columns: MMCS, ML2R (mean over linear1 and linear2), L0 (APD: active components per input, each spanning every
site; SPD: causally important subcomponents per input at CI > 0.1, summed over the sites), faithfulness relative
to the weights' mean square, the first evaluated step at which MMCS ≥ 0.99 and ML2R ≥ 0.8 and the wall time to it
(the run's wall time × that fraction of its steps), the run's steps and wall time; for a +ID target, how the
identity is held (APD: the largest share of it in one component and how many components hold more than a tenth; SPD: its
subcomponents alive). Runs go to `OUT/<preset>-s<seed>`; rerunning reuses finished runs and resumes interrupted
ones (wall time then unknown).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from seeds import seed_range

from unmerge import api, runs
from unmerge.config import SPDConfig

PAIRS = ["apd-tms-5-2:tms-5-2", "apd-tms-40-10:tms-40-10", "apd-tms-5-2-id:tms-5-2-id"]
QUALITY = {"mmcs": 0.99, "ml2r": 0.8}  # the bar both reach on TMS 5-2 (APD's paper: MMCS 0.998, ML2R 0.893)


def steps_to_quality(run_dir: Path, steps: int) -> int | None:
    """The first evaluated step meeting every bar of QUALITY (the final evaluation at `steps` included); None if
    none does."""
    rows = [json.loads(line) for line in (run_dir / runs.EVAL_LOG).read_text().splitlines() if line.strip()]
    rows.append({"step": steps, **runs.read_metrics(run_dir)})
    met = (row["step"] for row in rows if all(row.get(key, 0.0) >= bar for key, bar in QUALITY.items()))
    return next(met, None)


def run_one(preset: str, seed: int, eval_every: int, out: Path) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = api.load_run_config(preset, [f"train.seed={seed}", "train.threads=1", f"train.eval_every={eval_every}"])
    finished = runs.is_finished(out)
    start = time.perf_counter()
    result = api.decompose(config, out)
    metrics = result.metrics
    wall = None if finished or result.resumed_from else time.perf_counter() - start
    spd = isinstance(config.method, SPDConfig)
    reached = steps_to_quality(out, config.train.steps)
    row = {
        "preset": preset,
        "seed": seed,
        "mmcs": round(metrics["mmcs"], 4),
        "ml2r": round(metrics["ml2r"], 4),
        "l0": round(metrics["ci_l0/0.1"] if spd else metrics["attribution_l0"], 3),
        "faithfulness_relative": f"{metrics['faithfulness_relative']:.1e}",
        "steps_to_quality": "never" if reached is None else reached,
        "wall_s_to_quality": round(wall * reached / config.train.steps, 1) if wall and reached else None,
        "steps": config.train.steps,
        "wall_s": round(wall, 1) if wall else None,
    }
    if "alive/hidden" in metrics:
        row["identity"] = f"alive {metrics['alive/hidden']:.0f}"
    if "dense_largest_share/hidden" in metrics:
        share, count = metrics["dense_largest_share/hidden"], metrics["dense_components/hidden"]
        row["identity"] = f"largest share {share:.2f}, {count:.0f} components > 0.1"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=PAIRS, help="APD_PRESET:SPD_PRESET on the same target")
    parser.add_argument("--seeds", type=seed_range, default=seed_range("0-2"))
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/apd-vs-spd"))
    args = parser.parse_args()
    presets = [preset for pair in args.pairs for preset in pair.split(":")]
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [
            pool.submit(run_one, preset, seed, args.eval_every, args.out / f"{preset}-s{seed}")
            for preset in presets
            for seed in args.seeds
        ]
        rows = []
        for job in as_completed(jobs):  # each row as soon as its run ends
            rows.append(job.result())
            print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda row: (presets.index(row["preset"]), row["seed"]))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")


if __name__ == "__main__":
    main()
