"""Step times at fp32 and bf16 on one device, and agreement of a CUDA step with the CPU's.

    .venv/bin/python benchmarks/devices.py speed                    # CPU, one thread: SPD and dictionary steps
    python3 benchmarks/devices.py speed --device cuda               # the same on a GPU
    python3 benchmarks/devices.py agreement                         # one SPD and one dictionary step, CUDA vs CPU
    python3 benchmarks/devices.py smollm2 --device cuda             # SPD over all SmolLM2 MLPs (`make real`)

Each setting runs fp32 and bf16 alternately in the same process (these machines are noisy) through the loop's own
`step_loss` and `apply_gradients`; prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from unmerge import api
from unmerge.config import OptimConfig
from unmerge.sae.method import DictionaryMethod
from unmerge.spd.method import SPD
from unmerge.targets import cached_target
from unmerge.targets.language_data import language_target
from unmerge.targets.sources import activation_source
from unmerge.train.loop import Method, apply_gradients, make_optimizer, step_loss
from unmerge.train.rng import step_generator

SPD_SETTINGS = [("tms-5-2-id", 4096), ("resid-mlp-1", 2048)]
DICTIONARY = ("sparse-512-relu-l1", ["method.width=1024"], 4096)  # d 256 → 1024


def _spd(preset: str) -> tuple[SPD, Callable]:
    config = api.load_run_config(preset)
    target = cached_target(config.target)
    return SPD(target, config.method, seed=0), target.sample_inputs


def _dictionary() -> tuple[DictionaryMethod, Callable]:
    preset, overrides, _ = DICTIONARY
    config = api.load_dictionary_config(preset, overrides)
    source = activation_source(config.data)
    method = DictionaryMethod(source, config.method, seed=0, total_steps=10**6)
    method.before_training()
    return method, source.sample


def _stepper(method: Method, sample: Callable, batch: int, device: torch.device, precision: str) -> Callable:
    optimizer = make_optimizer(method.module, OptimConfig())
    counter = iter(range(10**9))

    def step() -> None:
        t = next(counter)
        inputs = sample(batch, step_generator(0, "data", t, 0, device))
        output = step_loss(method, inputs, step_generator(0, "noise", t, 0, device), precision)
        apply_gradients(method, optimizer, output.loss)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(name: str, build: Callable, batch: int, device: torch.device, steps: int) -> dict:
    """Median ms/step of fp32 and bf16, rounds alternating, each precision on its own copy of the method."""
    steppers = {}
    for precision in ("fp32", "bf16"):
        method, sample = build()
        method.to(device)
        steppers[precision] = _stepper(method, sample, batch, device, precision)
    times: dict[str, list[float]] = {precision: [] for precision in steppers}
    for step in steppers.values():
        for _ in range(10):
            step()
    for _ in range(steps // 10):
        for precision, step in steppers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(10):
                step()
            _sync(device)
            times[precision].append((time.perf_counter() - start) * 100)
    medians = {precision: statistics.median(values) for precision, values in times.items()}
    return {
        "benchmark": "step_ms",
        "setting": name,
        "batch": batch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        **{f"{precision}_ms": round(ms, 2) for precision, ms in medians.items()},
        "bf16_speedup": round(medians["fp32"] / medians["bf16"], 2),
    }


def agreement(steps: int = 3) -> list[dict]:
    """A few identical steps on CPU and CUDA from the same weights and the same CPU-drawn batches."""
    results = []
    for name, build, batch in [
        ("spd resid-mlp-1", lambda: _spd("resid-mlp-1"), 512),
        ("dictionary relu 256→1024", _dictionary, 1024),
    ]:
        finals = {}
        for device in (torch.device("cpu"), torch.device("cuda")):
            method, sample = build()
            method.to(device)
            optimizer = make_optimizer(method.module, OptimConfig())
            for t in range(steps):
                inputs = sample(batch, step_generator(0, "data", t)).to(device)
                output = step_loss(method, inputs, step_generator(0, "noise", t), "fp32")  # same mask keys
                apply_gradients(method, optimizer, output.loss)
            finals[device.type] = (
                float(output.loss),
                torch.cat([p.detach().cpu().flatten() for p in method.module.parameters()]),
            )
        (loss_cpu, params_cpu), (loss_cuda, params_cuda) = finals["cpu"], finals["cuda"]
        results.append(
            {
                "benchmark": "cuda_vs_cpu",
                "setting": name,
                "loss_cpu": loss_cpu,
                "loss_cuda": loss_cuda,
                "parameters_relative_difference": float((params_cuda - params_cpu).norm() / params_cpu.norm()),
            }
        )
    return results


def smollm2(device: torch.device, batch: int, steps: int) -> dict:
    """SPD over every MLP of SmolLM2-135M (preset smollm2-all-mlps, bf16): step time and peak memory."""
    config = api.load_run_config("smollm2-all-mlps")
    target = language_target(config.target)
    spd = SPD(target, config.method, seed=0)
    spd.to(device)
    step = _stepper(spd, target.sample_inputs, batch, device, config.train.precision)
    for _ in range(2):
        step()
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "benchmark": "smollm2-all-mlps",
        "device": str(device),
        "batch_windows": batch,
        "tokens_per_step": batch * config.target.text.seq_len,
        "precision": config.train.precision,
        "step_ms": round((time.perf_counter() - start) / steps * 1000, 1),
        "peak_memory_gib": round(peak, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "agreement", "smollm2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="windows per step for smollm2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.what == "agreement":
        results = agreement()
    elif args.what == "smollm2":
        results = [smollm2(device, args.batch, args.steps)]
    else:
        results = [
            side_by_side(preset, lambda p=preset: _spd(p), batch, device, args.steps) for preset, batch in SPD_SETTINGS
        ]
        results.append(side_by_side("dictionary relu 256→1024", _dictionary, DICTIONARY[2], device, args.steps))
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
