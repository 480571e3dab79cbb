"""Reconstruction of finished SPD runs under adversarial masks: how much worse the output gets when every
subcomponent is ablated as far as its causal importance permits in the worst direction the ascent finds
(`method.adversarial_steps` projected sign-gradient steps on r, masks in [g, 1]), beside the stochastic and
CI-masked reconstructions of the same evaluation batch.

    .venv/bin/python benchmarks/adversarial.py runs/bench/tms-5-2-s1 runs/bench/resid-mlp-1-s0 --steps 8

Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unmerge import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=8, help="ascent steps (default 8)")
    parser.add_argument("--step-size", type=float, default=0.25, help="change of r per step (default 0.25)")
    args = parser.parse_args()
    for run_dir in args.runs:
        config, spd, step = api.load_run(run_dir)
        spd.config = config.method.model_copy(
            update={"adversarial_steps": args.steps, "adversarial_step_size": args.step_size}
        )
        metrics = spd.evaluate()
        keys = ("stochastic_recon", "ci_masked_recon", "adversarial_recon", "output_mean_square", "ce_original")
        print(
            json.dumps(
                {
                    "benchmark": "adversarial_recon",
                    "run": str(run_dir),
                    "step": step,
                    "trained_adversarially": bool(config.method.adversarial_recon_coeff),
                    "ascent_steps": args.steps,
                    **{k: metrics[k] for k in keys if k in metrics},
                }
            )
        )


if __name__ == "__main__":
    main()
