"""Judge an SPD run (finished or still training) as the shorter run its checkpoint at STEP is: copies the run's
config (with `train.steps` = STEP), target and that one checkpoint into OUT, finishes the copy there (the final
evaluation, metrics and report) and checks it as `benchmarks/seeds.py` does. Only for a constant learning rate,
where the first STEP steps of a longer run are exactly the run of STEP steps (a decaying schedule is not). A run
keeps its last two checkpoints; train it with `--set train.keep_checkpoints=N` to judge earlier steps.

    .venv/bin/python benchmarks/at_step.py runs/bench/resid-seeds/r2-c150/preset/tpreset-s0 12000 OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from seeds import run_checks

from unmerge import api, runs
from unmerge.config import RunConfig, save_yaml


def checkpoint_at(run_dir: Path, step: int) -> Path:
    """The run's checkpoint directory at `step`; an error listing the saved steps if there is none."""
    checkpoint = run_dir / runs.CHECKPOINT_DIR / f"step-{step:07d}"
    if not checkpoint.is_dir():
        steps = ", ".join(p.name for p in runs.saved_steps(run_dir)) or "none"
        raise SystemExit(f"{run_dir} has no checkpoint at step {step} (it has: {steps})")
    return checkpoint


def truncated_copy(
    run_dir: Path, step: int, out: Path, steps: int | None = None, copy_checkpoint: bool = True
) -> RunConfig:
    """OUT as the run directory of `run_dir`'s first `step` steps, ready to finish (resume at its last step), or to
    train on to `steps` when given; without `copy_checkpoint`, the caller writes OUT's step-`step` checkpoint."""
    saved = runs.saved_config(run_dir, RunConfig)
    total = step if steps is None else steps
    config = saved.model_copy(update={"train": saved.train.model_copy(update={"steps": total})})
    if config.train.optim.schedule != "constant" or config.train.optim.warmup_steps > step:
        raise SystemExit(f"{run_dir}: its learning rate depends on train.steps, so step {step} is not a shorter run")
    checkpoint = checkpoint_at(run_dir, step)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new OUT")
    shutil.copytree(run_dir / runs.TARGET_DIR, out / runs.TARGET_DIR)
    if copy_checkpoint:
        shutil.copytree(checkpoint, out / runs.CHECKPOINT_DIR / checkpoint.name)
    save_yaml(config, out / runs.RUN_CONFIG)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("step", type=int)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = truncated_copy(args.run_dir, args.step, args.out)
    metrics = api.decompose(config, args.out).metrics
    print(json.dumps({"run": str(args.run_dir), "step": args.step, **run_checks(config, metrics, args.out)}))


if __name__ == "__main__":
    main()
