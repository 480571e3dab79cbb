"""Whole-model SPD of a language model (issue 24): a preset's sites over the first N layers (bounded, for the CPU)
or over all of them (a GPU), trained through `unmerge.api.decompose`; prints one JSON line with CE of the original
and of the CI-masked model, the KL of the stochastically masked model, alive subcomponents, subcomponents active
per token (CI-L0), wall time, time per step and peak memory.

    python benchmarks/whole_lm.py smollm2-all --layers 2 --steps 100 --batch 4 --seq-len 64   # CPU, bounded
    python benchmarks/whole_lm.py smollm2-all --device cuda --steps 300                       # one GPU, all layers

Peak memory is CUDA's `max_memory_allocated` on a GPU and the process's peak resident set size on the CPU (model
load included). Needs `make real` (SmolLM2 and the corpus).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from unmerge import api


def _site_overrides(preset: str, layers: int | None) -> list[str]:
    """Restrict every `.layers.*.` site pattern to layers 0 … layers − 1 (fnmatch: one digit per bracket)."""
    if layers is None:
        return []
    if not 1 <= layers <= 10:
        raise SystemExit("--layers takes 1 … 10 (a one-digit fnmatch range); leave it out for every layer")
    config = api.load_run_config(preset)
    return [
        f"method.sites.{i}.pattern={site.pattern.replace('.layers.*.', f'.layers.[0-{layers - 1}].')}"
        for i, site in enumerate(config.method.sites)
    ]


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(args: argparse.Namespace) -> dict:
    optional = {
        "train.batch_size": args.batch,
        "train.eval_batch_size": args.eval_batch,
        "target.text.seq_len": args.seq_len,
    }
    overrides = _site_overrides(args.preset, args.layers) + [
        f"train.steps={args.steps}",
        f"train.device={args.device}",
        f"train.checkpoint_every={args.steps}",
        f"method.faithfulness_warmup_steps={args.warmup}",
        *(f"{key}={value}" for key, value in optional.items() if value),
        *args.set,
    ]
    config = api.load_run_config(args.preset, overrides)
    run_dir = Path(args.out or tempfile.mkdtemp(prefix="whole-lm-"))
    start = time.perf_counter()
    result = api.decompose(config, run_dir)
    seconds = time.perf_counter() - start
    metrics = result.metrics
    sites = [key.removeprefix("alive/") for key in metrics if key.startswith("alive/")]
    C = {name: next(s.C for s in config.method.sites if fnmatchcase(name, s.pattern)) for name in sites}
    return {
        "benchmark": "whole_lm",
        "preset": args.preset,
        "layers": args.layers or "all",
        "sites": len(sites),
        "subcomponents": sum(C.values()),
        "device": args.device,
        "precision": config.train.precision,
        "steps": config.train.steps,
        "tokens_per_step": config.train.batch_size * config.target.text.seq_len,
        "ce_original": metrics["ce_original"],
        "ce_ci_masked": metrics["ce_ci_masked"],
        "ce_gap": metrics["ce_ci_masked"] - metrics["ce_original"],
        "stochastic_recon_kl": metrics["stochastic_recon"],
        "ci_masked_kl": metrics["ci_masked_recon"],
        "faithfulness_relative": metrics["faithfulness_relative"],
        "alive": metrics["alive"],
        "ci_l0_per_token": metrics["ci_l0/0.1"],
        "wall_s": round(seconds, 1),  # model load, warm-up, the steps, evaluation and report
        "peak_memory_gib": round(_peak_memory_gib(args.device), 2),
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", default="smollm2-all")
    parser.add_argument("--layers", type=int, help="decompose layers 0 … N−1 only (default: every layer)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="faithfulness warm-up steps (data-free)")
    parser.add_argument("--batch", type=int, help="windows per step (default: the preset's)")
    parser.add_argument("--eval-batch", type=int, help="windows evaluated (default: the preset's)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="run directory (default: a new temporary one)")
    parser.add_argument("--set", action="append", default=[], help="another override, KEY=VALUE")
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
