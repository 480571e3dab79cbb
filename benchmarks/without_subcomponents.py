"""Is a run's extra live subcomponent a local minimum? Copies the run's checkpoint at STEP into OUT with the named
subcomponents' weights removed (their columns of U, and of U's Adam moments, set to zero), trains the copy on to
`--steps` and checks it as `benchmarks/seeds.py` does. If the subcomponent stays dead and the loss is no higher,
the run without it is as good a solution that training did not find. A diagnostic, not a recipe: a run passes only
as trained. Only for a constant learning rate (the copy is the run's first STEP steps, as `at_step.py`'s).

    .venv/bin/python benchmarks/without_subcomponents.py runs/bench/resid-seeds/r3-fin3-20k/preset/tpreset-s2 \
        12000 OUT --remove layers.1.mlp_out:83 --steps 14000
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from at_step import checkpoint_at, truncated_copy
from seeds import run_checks
from torch import Tensor

from unmerge import api
from unmerge.spd.records import site_key
from unmerge.train.checkpoint import load_checkpoint, save_checkpoint

SAVED_STATE = ("step", "format", "weights_sha256")  # written anew by `save_checkpoint`


def parse_removal(text: str) -> tuple[str, int]:
    """`layers.1.mlp_out:83` → (site, subcomponent)."""
    site, _, index = text.rpartition(":")
    if not site or not index.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected SITE:INDEX, e.g. layers.1.mlp_out:83")
    return site, int(index)


def remove_subcomponents(tensors: dict[str, Tensor], removals: list[tuple[str, int]]) -> None:
    """Zero each (site, c)'s column of the site's U and of U's Adam moments, in place: its rank-1 weight is gone."""
    for site, c in removals:
        name = f"{site_key(site)}.components.U"
        if name not in tensors:
            raise SystemExit(f"the checkpoint has no {name}: is {site!r} a site with its own (untied) subcomponents?")
        if not 0 <= c < tensors[name].shape[1]:
            raise SystemExit(f"{site} has subcomponents 0 to {tensors[name].shape[1] - 1}, not {c}")
        for key in (name, f"optimizer.{name}.exp_avg", f"optimizer.{name}.exp_avg_sq"):
            if key in tensors:
                tensors[key][:, c] = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("step", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--remove", type=parse_removal, nargs="+", required=True, metavar="SITE:INDEX")
    parser.add_argument("--steps", type=int, required=True, help="train the copy on to this step")
    args = parser.parse_args()
    if args.steps <= args.step:
        raise SystemExit(f"--steps {args.steps} must exceed STEP {args.step}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tensors, state = load_checkpoint(checkpoint_at(args.run_dir, args.step))
    remove_subcomponents(tensors, args.remove)  # checked before OUT is written
    config = truncated_copy(args.run_dir, args.step, args.out, steps=args.steps, copy_checkpoint=False)
    kept = {k: v for k, v in state.items() if k not in SAVED_STATE}
    save_checkpoint(args.out, args.step, tensors, kept, keep=config.train.keep_checkpoints)
    metrics = api.decompose(config, args.out).metrics
    print(
        json.dumps(
            {
                "run": str(args.run_dir),
                "step": args.step,
                "removed": args.remove,
                "steps": args.steps,
                **run_checks(config, metrics, args.out),
            }
        )
    )


if __name__ == "__main__":
    main()
