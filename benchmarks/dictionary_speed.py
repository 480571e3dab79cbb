"""Dictionary training-step speed, single thread (d = 256, 1024 latents, batch 4096): activations per second for
ReLU + L1 and TopK k = 16, each also as a fraction of this machine's plain matrix-multiply throughput measured in
the same run (interleaved with the steps, since these machines are noisy).

    .venv/bin/python benchmarks/dictionary_speed.py              # the acceptance setting
    .venv/bin/python benchmarks/dictionary_speed.py --rounds 5   # quicker look

A step is what the training loop does: the method's loss, backward, AdamW, the method's `after_step`, through the
real `DictionaryMethod` on one pre-generated batch (data generation is not timed). A dense step needs five
(B × d) · (d × m) matrix products: the encoder and decoder forwards, the latents' gradient, and the gradients of
W_d and W_e (the input needs no gradient), so

    fraction of matmul throughput = 5 · 2 B d m / step time / (2 B d m / matmul time) = 5 · matmul time / step time.

Bars (issue 3, criterion f): dense ReLU ≥ 0.7 of matmul throughput; TopK ≥ 1.8 × ReLU's activations per second.
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unmerge.config import DictionaryConfig, OptimConfig, PenaltyConfig, SparseFeaturesConfig, dictionary_config
from unmerge.data import ActivationSource, sparse_feature_source
from unmerge.sae.method import DictionaryMethod
from unmerge.train.loop import make_optimizer
from unmerge.train.memory import keep_freed_memory
from unmerge.train.rng import step_generator

DIM, WIDTH, BATCH, K = 256, 1024, 4096, 16
DENSE_MATMULS = 5
RELU_FRACTION_BAR = 0.7
TOPK_RATIO_BAR = 1.8

SETTINGS: dict[str, DictionaryConfig] = {
    "relu_l1": dictionary_config(width=WIDTH, activation="relu", penalty=PenaltyConfig(name="l1", coeff=3e-2)),
    "topk": dictionary_config(width=WIDTH, activation="topk", k=K, penalty=PenaltyConfig(name="none")),
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_step(source: ActivationSource, config: DictionaryConfig, batch: torch.Tensor) -> Callable[[], None]:
    """One step of the training loop for a fresh `DictionaryMethod` (the loop's own order of calls)."""
    method = DictionaryMethod(source, config, seed=0, total_steps=10_000)
    method.before_training()
    optimizer = make_optimizer(method.module, OptimConfig(lr=1e-4))  # as the training loop builds it
    noise = step_generator(0, "noise")

    def step() -> None:
        output = method.training_loss(batch, noise)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        method.after_step(optimizer)

    return step


def measure(rounds: int, repeats: int, warmup: int) -> dict[str, object]:
    source = sparse_feature_source(SparseFeaturesConfig(n_features=512, dim=DIM))
    batch = source.sample(BATCH, step_generator(0, "bench"))
    a, b = torch.randn(BATCH, DIM), torch.randn(DIM, WIDTH)
    candidates: dict[str, Callable[[], object]] = {"matmul": lambda: a @ b}
    candidates |= {name: training_step(source, config, batch) for name, config in SETTINGS.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):  # interleaved, so drift in the machine's speed hits every candidate alike
        for name, fn in candidates.items():
            samples[name] += [timed(fn) for _ in range(repeats)]
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    flops = 2 * BATCH * DIM * WIDTH
    results: dict[str, object] = {
        "benchmark": "dictionary_step",
        "dim": DIM,
        "width": WIDTH,
        "batch": BATCH,
        "k": K,
        "threads": torch.get_num_threads(),
        "samples_per_candidate": rounds * repeats,
        "matmul_ms": round(seconds["matmul"] * 1e3, 3),
        "matmul_gflops": round(flops / seconds["matmul"] / 1e9, 2),
    }
    for name in SETTINGS:
        results[name] = {
            "ms_per_step": round(seconds[name] * 1e3, 2),
            "activations_per_s": round(BATCH / seconds[name]),
            "fraction_of_matmul": round(DENSE_MATMULS * seconds["matmul"] / seconds[name], 3),
            "spread_ms": [round(q * 1e3, 2) for q in statistics.quantiles(samples[name], n=4)],
        }
    relu, topk = results["relu_l1"], results["topk"]
    assert isinstance(relu, dict) and isinstance(topk, dict)
    ratio = topk["activations_per_s"] / relu["activations_per_s"]
    results["topk_over_relu"] = round(ratio, 2)
    results["bars"] = {
        f"relu_fraction >= {RELU_FRACTION_BAR}": relu["fraction_of_matmul"] >= RELU_FRACTION_BAR,
        f"topk_over_relu >= {TOPK_RATIO_BAR}": ratio >= TOPK_RATIO_BAR,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds over matmul, ReLU and TopK")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-speed/dictionary_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the training loop does
    results = measure(args.rounds, args.repeats, args.warmup)
    print(
        f"matmul ({BATCH}×{DIM})@({DIM}×{WIDTH}) fp32, 1 thread: {results['matmul_ms']} ms = "
        f"{results['matmul_gflops']} GFLOP/s"
    )
    print(f"{'setting':<10} {'ms/step':>9} {'act/s':>9} {'fraction of matmul':>19}  quartiles ms")
    for name in SETTINGS:
        row = results[name]
        assert isinstance(row, dict)
        print(
            f"{name:<10} {row['ms_per_step']:>9} {row['activations_per_s']:>9} {row['fraction_of_matmul']:>19}"
            f"  {row['spread_ms']}"
        )
    print(f"TopK / ReLU activations per second: {results['topk_over_relu']}")
    bars = results["bars"]
    assert isinstance(bars, dict)
    for bar, passed in bars.items():
        print(f"{'PASS' if passed else 'FAIL'}  {bar}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
