"""SIGKILL at a random moment, then the same command again: is the resumed run bitwise identical to an
uninterrupted one? For SPD, a dictionary, and SPD under torchrun (2 CPU ranks).

    .venv/bin/python benchmarks/sigkill.py --trials 20                     # SPD and dictionary, 20 trials each
    .venv/bin/python benchmarks/sigkill.py --trials 5 --kinds torchrun

Each trial starts the CLI in a new run directory, kills it (the whole process group, and any torchrun worker,
which runs in a session of its own) after a delay drawn uniformly from (0.2 s, the uninterrupted run's wall time),
reruns the same command to completion, and compares every tensor of the final checkpoint and every value of
`metrics.json` with the uninterrupted run's. Prints one JSON line per trial and one summary line per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from unmerge.runs import CHECKPOINT_DIR, METRICS_FILE, saved_steps
from unmerge.train.checkpoint import WEIGHTS_FILE

SPD = ["decompose", "tms-5-2", "target.train.steps=300", "train.steps=1000", "train.batch_size=256"]
SPD += ["train.eval_batch_size=256", "train.checkpoint_every=25", "train.log_every=10", "train.threads=1"]
DICTIONARY = ["train-dictionary", "hierarchy-relu-l1", "train.steps=1000", "train.checkpoint_every=25"]
DICTIONARY += ["train.eval_batch_size=512", "train.threads=1"]
KINDS = {"spd": (1, SPD), "dictionary": (1, DICTIONARY), "torchrun": (2, SPD)}


def command(ranks: int, args: list[str], out: Path) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "unmerge.cli", *args, "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*launcher, "-m", "unmerge.cli", *args, "--out", str(out)]


def kill_everything_writing(run_dir: Path) -> None:
    """SIGKILL every process whose command line names `run_dir` (torchrun's workers run in their own sessions)."""
    for _ in range(200):
        found = []
        for proc in Path("/proc").iterdir():
            try:
                alive = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                if proc.name.isdigit() and alive and str(run_dir) in (proc / "cmdline").read_bytes().decode("latin-1"):
                    found.append(int(proc.name))
            except (OSError, IndexError):
                continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"processes writing {run_dir} survived SIGKILL")


def run_to_end(ranks: int, args: list[str], out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command(ranks, args, out), capture_output=True, text=True, env=ENV)
    if result.returncode:
        raise RuntimeError(f"{out}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return result


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(str(saved_steps(run_dir)[-1] / WEIGHTS_FILE))
    return tensors, json.loads((run_dir / METRICS_FILE).read_text())


def identical(a: tuple[dict[str, torch.Tensor], dict], b: tuple[dict[str, torch.Tensor], dict]) -> bool:
    (ta, ma), (tb, mb) = a, b
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and ma == mb


def trials(kind: str, n: int, root: Path, rng: random.Random) -> list[dict]:
    ranks, args = KINDS[kind]
    start = time.perf_counter()
    run_to_end(ranks, args, root / f"{kind}-whole")
    whole_seconds = time.perf_counter() - start
    reference = final_state(root / f"{kind}-whole")
    rows = []
    for trial in range(n):
        out = root / f"{kind}-{trial}"
        delay = rng.uniform(0.2, whole_seconds)
        process = subprocess.Popen(
            command(ranks, args, out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
            start_new_session=True,
        )
        time.sleep(delay)
        finished_first = process.poll() is not None
        if not finished_first:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kill_everything_writing(out)
        checkpoints = [p.name for p in saved_steps(out)]
        staging = len(list((out / CHECKPOINT_DIR).glob(".staging-*"))) if (out / CHECKPOINT_DIR).is_dir() else 0
        resumed = run_to_end(ranks, args, out)
        row = {
            "kind": kind,
            "trial": trial,
            "kill_after_s": round(delay, 2),
            "finished_before_kill": finished_first,
            "checkpoints_at_kill": checkpoints[-1] if checkpoints else None,
            "staging_left_at_kill": staging,
            "resumed_from": next(
                (line.split()[-1] for line in resumed.stdout.splitlines() if line.startswith("resumed from step")), 0
            ),
            "identical": identical(final_state(out), reference),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    same = sum(row["identical"] for row in rows)
    print(json.dumps({"kind": kind, "trials": n, "identical": same, "uninterrupted_s": round(whole_seconds, 1)}))
    return rows


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kinds", default="spd,dictionary", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="sigkill-"))
    rng = random.Random(args.seed)
    for kind in args.kinds.split(","):
        trials(kind, args.trials, root, rng)


if __name__ == "__main__":
    main()
