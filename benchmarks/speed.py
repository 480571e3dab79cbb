"""SPD training-step speed, single thread: median ms/step over ≥ 200 steps after warm-up, and the ratio to the
target's own forward+backward at the same batch (measured in the same run, since these machines are noisy).

    .venv/bin/python benchmarks/speed.py            # every setting
    .venv/bin/python benchmarks/speed.py --steps 50 # quicker look

Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch

from unmerge import api
from unmerge.config import OptimConfig
from unmerge.spd.method import SPD
from unmerge.targets import cached_target
from unmerge.targets.toys import RECIPES
from unmerge.train.loop import make_optimizer
from unmerge.train.memory import keep_freed_memory
from unmerge.train.rng import step_generator

PAPER_TMS_5_2_ID = ["method.sites=[{pattern: linear1, C: 20}, {pattern: hidden, C: 20}, {pattern: linear2, C: 20}]"]
PAPER_RESID_MLP_1 = ["method.sites=[{pattern: layers.*.mlp_in, C: 100}, {pattern: layers.*.mlp_out, C: 100}]"]
SETTINGS = [  # preset, overrides, batch, acceptance bound in ms/step (None: measured, no bound)
    ("tms-5-2-id", PAPER_TMS_5_2_ID, 4096, 15.0),  # the bound was set at the paper's C = 20 per site
    ("tms-5-2-id", [], 4096, None),  # the preset: the tms rule's C = 40 per site
    ("resid-mlp-1", PAPER_RESID_MLP_1, 2048, 70.0),  # the bound was set at the paper's C = 100 per site
    ("resid-mlp-1", [], 2048, None),  # the preset: W_in's C = 150
]


def median_ms(step: Callable[[], None], steps: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(
    preset: str, overrides: list[str], batch_size: int, steps: int, bound: float | None
) -> dict[str, float | str | int | None]:
    config = api.load_run_config(preset, overrides)
    target = cached_target(config.target)
    x = target.sample_inputs(batch_size, step_generator(0, "bench"))
    spd = SPD(target, config.method, seed=0)
    optimizer = make_optimizer(spd.module, OptimConfig(lr=1e-4))  # as the training loop builds it

    def spd_step() -> None:
        output = spd.training_loss(x, step_generator(0, "noise"))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()

    trainable = copy.deepcopy(target.model).requires_grad_(True)
    for name, parameter in trainable.named_parameters():
        parameter.requires_grad_(name != "hidden.weight")
    loss_fn = RECIPES[config.target.kind].loss

    def target_step() -> None:
        trainable.zero_grad(set_to_none=True)
        loss_fn(trainable, x).backward()

    target_ms = median_ms(target_step, steps)
    spd_ms = median_ms(spd_step, steps)
    sites = {name: spd.model.site_C[name] for name in spd.model.site_names}
    return {
        "benchmark": "spd_step",
        "preset": preset,
        "batch": batch_size,
        "sites": json.dumps(sites),
        "threads": torch.get_num_threads(),
        "steps_timed": steps,
        "spd_ms_per_step": round(spd_ms, 2),
        "target_fwd_bwd_ms": round(target_ms, 3),
        "ratio_to_target": round(spd_ms / target_ms, 1),
        "bound_ms": bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per setting (after 20 warm-up steps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the training loop does
    for preset, overrides, batch_size, bound in SETTINGS:
        print(json.dumps(measure(preset, overrides, batch_size, args.steps, bound)), flush=True)


if __name__ == "__main__":
    main()
