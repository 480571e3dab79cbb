"""SAELens against unmerge on the same cached activations (issue #4, criterion b): the `smollm2-resid-topk`
dictionary configuration (TopK k=32, width 2304, AuxK, 6000 steps of 1024 rows, Adam 5e-4 cosine) trained with
SAELens's own TopK training SAE and trainer, then scored by unmerge's one evaluation next to unmerge's run.

SAELens is not an unmerge dependency: it lives in a separate virtual environment (here
/tmp/saelensres/venv, `pip install sae-lens==6.54.12` with the CPU torch), and the two halves run in different
environments:

    # 1. train with SAELens (in SAELens's venv; reads the cache directly, imports nothing of unmerge but
    #    src/unmerge/train/rng.py, loaded by path, for the same batches)
    OMP_NUM_THREADS=1 /tmp/saelensres/venv/bin/python benchmarks/saelens_comparison.py train \\
        --cache /tmp/umcache/activations/smollm2-model.layers.14-51096027c85f --out runs/saelens-topk

    # 2. score both dictionaries with unmerge's spliced evaluation (in unmerge's venv, offline)
    OMP_NUM_THREADS=1 UNMERGE_CACHE_DIR=/tmp/umcache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        .venv/bin/python benchmarks/saelens_comparison.py compare --saelens runs/saelens-topk \\
        --unmerge runs/smollm2-topk

The cache is the preset's (`unmerge cache-activations smollm2-resid-topk` builds it; its directory, keyed by the
settings, is `activation_cache_dir(load_dictionary_config("smollm2-resid-topk").data)` from
`unmerge.targets.language_activations`; `compare` checks by the shards' checksums that SAELens trained on it).

`train` writes SAELens's inference export (`cfg.json`, `sae_weights.safetensors`, the activation normalisation
folded in by SAELens's trainer and the decoder norms by its `save_inference_model`), `train_log.jsonl` (losses,
batch FVU, learning rate, dead latents every 50 steps), `train_summary.json` (wall time, steps/s, settings) and
`probe.safetensors` (inputs and SAELens's own reconstructions of them, reloaded with `SAE.load_from_disk`).
`compare` loads the export with `unmerge.sae.saelens.load_saelens`, checks it reproduces the probe, checks that
SAELens followed unmerge's learning-rate schedule step by step, and scores it and unmerge's dictionary
(`unmerge.api.load_dictionary`) identically: FVU and L0 on the training distribution (the rows unmerge's own
end-of-run evaluation draws, `step_generator(seed, "eval")`, so unmerge's figure must reproduce its metrics.json)
and the held-out spliced evaluation (`unmerge.eval.language.spliced_evaluator`: FVU, L0, CE original / spliced,
KL, CE recovered against zero and mean ablation). It prints a markdown table with unmerge's metrics.json as a
further column.

Same in both: the cached rows and the batches (`torch.randint(n, (1024,), step_generator(0, "data", step))` over
the cache's rows in shard order), TopK k=32 with ReLU on the kept values, width 2304, encoder centred by b_dec,
loss Σ_d (x − x̂)² averaged over the batch, Adam (β 0.9 / 0.999, ε 1e-8, no weight decay), lr 5e-4 with 200
linear warm-up steps (lr·(t+1)/200) and cosine decay to 5e-5 at step 6000 (checked by `compare`), inputs
normalised to mean norm √d and the scale folded back at the end, decoder bias started at the mean of the
normalised rows of the same 8,192-row sample (`step_generator(0, "dictionary-init")`), a latent dead after 98
steps (100,352 samples) without firing, AuxK coefficient 1/32.

Differences that SAELens 6.54's configuration cannot remove (what each does is in `CONFIG_DIFFERENCES`):
the normalising scale (SAELens's exact √d / mean‖x‖; unmerge rounds it to a power of two), the decoder-norm
handling (SAELens: free decoder rows with `rescale_acts_by_decoder_norm`; unmerge: rows renormalised to 1 after
every step, gradient projected onto the tangent space), the AuxK term (SAELens: k_aux = d_in/2 = 288, weighted by
min(dead/288, 1), unnormalised squared error; unmerge: k_aux 256, squared error divided by the residual's squared
norm), SAELens's fixed gradient-norm clipping at 1.0 (unmerge does not clip), the initialisation (SAELens:
Kaiming-uniform rows at norm 0.1; unmerge: Gaussian rows, decoder at norm 1, encoder its transpose at 0.1), the
decoder bias start (SAELens 6 has no option for it; this script sets the parameter before training), and the
dead mask's timing (SAELens's counts the steps before the current batch, unmerge's includes it).

Ablations of `train` (each changes one of these, for explaining a gap): `--scale power-of-two` (unmerge's scale),
`--b-dec-init zeros` (SAELens 6's own start), `--no-grad-clip` (skips SAETrainer's clipping) and
`--aux-coefficient C` (e.g. about (1/32) / mean‖e‖² ≈ 8e-4, the weight unmerge's normalised AuxK has relative to
its reconstruction term). `compare --set KEY=VALUE` scores an unmerge run trained with overrides (reported as a
config difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PRESET = "smollm2-resid-topk"

# The preset's dictionary and training settings, as resolved by unmerge (`compare` checks these against
# `unmerge.api.load_dictionary_config(PRESET)`: `train` runs where unmerge cannot be imported).
SETTINGS: dict[str, Any] = {
    "width": 2304,
    "k": 32,
    "aux_k": 256,
    "aux_k_coeff": 1 / 32,
    "dead_window": 100_000,
    "init_decoder_norm": 0.1,
    "steps": 6000,
    "batch_size": 1024,
    "seed": 0,
    "lr": 5e-4,
    "warmup_steps": 200,
    "final_lr_fraction": 0.1,
    "init_samples": 8192,
    "eval_batch_size": 4096,
}
LOG_EVERY = 50
PROBE_ROWS = 512
DIAGNOSTIC_ROWS = 65_536  # cached rows for the outlier split (`outlier_split`)
OUTLIER_FACTOR = 10.0  # a row is a massive-norm outlier above this multiple of the median norm

CONFIG_DIFFERENCES = [
    (
        "activation scale",
        "√d / mean‖x‖ on the 8,192-row init sample, exact (SAELens's ActivationScaler)",
        "the power of two nearest to √d / mean‖x‖ on the same sample",
    ),
    (
        "decoder norm",
        "free rows; pre-activations multiplied by ‖W_dec,i‖ (rescale_acts_by_decoder_norm), so the "
        "norm acts as a per-latent encoder gain; folded out on export",
        "rows renormalised to 1 after every step; the gradient's radial part projected out",
    ),
    (
        "AuxK",
        "k_aux = d_in/2 = 288 (fixed), mean ‖e − ê‖² × min(dead/288, 1) × 1/32",
        "k_aux = 256, mean ‖e − ê‖² / mean ‖e‖² × 1/32",
    ),
    ("gradient clipping", "global norm clipped to 1.0 every step (hard-coded in SAETrainer)", "none"),
    (
        "initialisation",
        "Kaiming-uniform decoder rows scaled to norm 0.1, encoder = decoder transpose (torch seed 0)",
        "Gaussian decoder rows at norm 1, encoder = transpose at norm 0.1 (step_generator(0, 'init'))",
    ),
    (
        "decoder bias start",
        "SAELens 6 has no option; this script copies the mean of the scaled init sample into b_dec before training",
        "mean of the normalised init sample (decoder_bias_init: mean)",
    ),
    (
        "dead mask timing",
        "steps without firing before the current batch (> 97 steps)",
        "samples without firing including the current batch (≥ 100,000)",
    ),
]


def load_rng_module() -> Any:
    """unmerge's `train/rng.py` by path (it needs only torch), so both trainers draw the same batches."""
    path = REPO / "src" / "unmerge" / "train" / "rng.py"
    spec = importlib.util.spec_from_file_location("unmerge_rng", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_fingerprint(directory: Path) -> list[str]:
    """The SHA-256 checksums of a cache's shards, in order, from its manifest: two caches with the same list hold
    the same rows in the same order, wherever their directories are (the directory name is a key of the settings
    that unmerge may change)."""
    return [shard["sha256"] for shard in json.loads((directory / "manifest.json").read_text())["shards"]]


def read_cache_rows(directory: Path) -> torch.Tensor:
    """All activation rows of a finished unmerge activation cache, float32, in shard order (what
    `ActivationCache.load()` returns, without importing unmerge)."""
    from safetensors.torch import load_file

    manifest = json.loads((directory / "manifest.json").read_text())
    if not manifest.get("complete"):
        raise SystemExit(f"the activation cache at {directory} is not complete yet (manifest says complete: false)")
    rows = torch.empty(sum(shard["rows"] for shard in manifest["shards"]), manifest["dim"])
    offset = 0
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if path.stat().st_size != shard["bytes"]:
            raise SystemExit(f"{path} has {path.stat().st_size} bytes, the manifest says {shard['bytes']}")
        rows[offset : offset + shard["rows"]] = load_file(str(path))["activations"]
        offset += shard["rows"]
    return rows


def unmerge_learning_rate(step: int, steps: int) -> float:
    """unmerge's schedule (`unmerge.train.schedule.learning_rate`) for the preset, for checking SAELens's."""
    lr, warmup, floor = SETTINGS["lr"], SETTINGS["warmup_steps"], SETTINGS["final_lr_fraction"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------- train


def train(args: argparse.Namespace) -> None:
    import sae_lens
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    rng = load_rng_module()
    seed, batch_size, steps = SETTINGS["seed"], SETTINGS["batch_size"], args.steps
    rows = read_cache_rows(args.cache)
    n, d_in = rows.shape
    print(f"cache {args.cache}: {n} rows × {d_in}", flush=True)

    # unmerge's initialisation sample: the scale and the decoder bias come from the same rows.
    init_generator = rng.step_generator(seed, "dictionary-init")
    init_sample = rows[torch.randint(n, (SETTINGS["init_samples"],), generator=init_generator)]
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(
        d_in, iter(init_sample.split(batch_size)), n_batches_for_norm_estimate=math.ceil(len(init_sample) / batch_size)
    )
    mean_norm = float(init_sample.norm(dim=1).mean())
    unmerge_scale = 2.0 ** round(math.log2(math.sqrt(d_in) / mean_norm))
    if args.scale == "power-of-two":
        scaler.scaling_factor = unmerge_scale
    print(
        f"mean ‖x‖ {mean_norm:.4f}; scale {scaler.scaling_factor:.6f} ({args.scale}; unmerge's {unmerge_scale:g})",
        flush=True,
    )

    torch.manual_seed(seed)
    sae_config = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=SETTINGS["width"],
        k=SETTINGS["k"],
        aux_loss_coefficient=args.aux_coefficient,
        rescale_acts_by_decoder_norm=True,
        decoder_init_norm=SETTINGS["init_decoder_norm"],
        normalize_activations="expected_average_only_in",
        apply_b_dec_to_input=True,
        dtype="float32",
        device="cpu",
    )
    sae_config.metadata.hook_name = "model.layers.14"
    sae_config.metadata.model_name = "smollm2"
    sae = TopKTrainingSAE(sae_config)
    if args.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(scaler(init_sample).mean(0))

    # unmerge: dead once samples_since_fired ≥ dead_window, i.e. after ceil(100000 / 1024) = 98 steps without
    # firing; SAELens: dead once steps without firing > dead_feature_window.
    dead_steps = math.ceil(SETTINGS["dead_window"] / batch_size)
    trainer_config = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=SETTINGS["lr"],
        lr_end=SETTINGS["lr"] * SETTINGS["final_lr_fraction"],
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=SETTINGS["warmup_steps"],
        lr_decay_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        autocast=False,
        dead_feature_window=dead_steps - 1,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )

    def batches():
        step = 0
        while True:
            yield rows[torch.randint(n, (batch_size,), generator=rng.step_generator(seed, "data", step))]
            step += 1

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log_path.write_text("")

    learning_rates: list[float] = []
    grad_norms: list[float] = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters: Any, max_norm: float, *rest: Any, **options: Any) -> torch.Tensor:
        """SAETrainer's hard-coded `clip_grad_norm_(sae.parameters(), 1.0)`, recording the norm before clipping;
        with --no-grad-clip (an ablation) it only measures."""
        parameters = list(parameters)
        if args.no_grad_clip:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        else:
            norm = clip_grad_norm(parameters, max_norm, *rest, **options)
        grad_norms.append(float(norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = recording_clip

    class LoggingTrainer(SAETrainer):
        """SAELens's trainer, unchanged but for a training log every LOG_EVERY steps (and the lr every step)."""

        def step(self, batch: torch.Tensor):  # type: ignore[override]
            learning_rates.append(self.optimizer.param_groups[0]["lr"])
            output = super().step(batch)
            done = self.n_training_steps + 1
            if done % LOG_EVERY == 0 or done == steps:
                with torch.no_grad():
                    x, x_hat = output.sae_in, output.sae_out
                    fvu = float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())
                    record = {
                        "step": done,
                        "lr": learning_rates[-1],
                        "fvu": fvu,
                        "l0": float((output.feature_acts != 0).float().sum(-1).mean()),
                        "dead": int(self.dead_neurons.sum()),
                        "grad_norm": grad_norms[-1],
                        **{name: float(value) for name, value in output.losses.items()},
                    }
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            return output

    trainer = LoggingTrainer(cfg=trainer_config, sae=sae, data_provider=batches())
    trainer.activation_scaler.scaling_factor = scaler.scaling_factor  # fit() keeps a factor already set
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    assert trainer.n_training_steps == steps, (trainer.n_training_steps, steps)
    print(f"trained {steps} steps in {wall:.1f} s ({steps / wall:.2f} steps/s)", flush=True)

    sae.save_inference_model(args.out)
    # SAELens's own reading of the export: reconstructions of raw rows, for `compare` to reproduce.
    inference = SAE.load_from_disk(str(args.out), device="cpu")
    probe_rows = rows[torch.randint(n, (PROBE_ROWS,), generator=rng.step_generator(seed, "saelens-probe"))]
    with torch.no_grad():
        probe = {
            "inputs": probe_rows,
            "reconstructions": inference(probe_rows).contiguous(),
            "latents": inference.encode(probe_rows).contiguous(),
            "learning_rates": torch.tensor(learning_rates, dtype=torch.float64),
        }
    save_file(probe, str(args.out / "probe.safetensors"))
    summary = {
        "cache": str(args.cache),
        "cache_rows": n,
        "cache_shards_sha256": cache_fingerprint(args.cache),
        "steps": steps,
        "batch_size": batch_size,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "threads": torch.get_num_threads(),
        "scaling_factor": scaler.scaling_factor,
        "scale_mode": args.scale,
        "unmerge_scale": unmerge_scale,
        "b_dec_init": args.b_dec_init,
        "aux_coefficient": args.aux_coefficient,
        "dead_feature_window": trainer_config.dead_feature_window,
        "final_dead": int(trainer.dead_neurons.sum()),
        "grad_clip": not args.no_grad_clip,
        "clipped_fraction": sum(norm > 1.0 for norm in grad_norms) / len(grad_norms),
        "grad_norm_median": float(torch.tensor(grad_norms).median()),
        "sae_lens": sae_lens.__version__,
        "torch": torch.__version__,
        "sae_config": {key: value for key, value in sae_config.to_dict().items() if key != "metadata"},
        "trainer_config": {key: value for key, value in vars(trainer_config).items() if key != "logger"},
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(
        json.dumps(
            {
                key: summary[key]
                for key in (
                    "wall_s",
                    "steps_per_s",
                    "scaling_factor",
                    "final_dead",
                    "clipped_fraction",
                    "grad_norm_median",
                )
            }
        )
    )


# -------------------------------------------------------------------------------------------------- compare


def check_settings(config: Any) -> list[str]:
    """Where SETTINGS (what `train` used) disagree with the preset as unmerge resolves it."""
    method, train_config = config.method, config.train
    resolved = {
        "width": method.width,
        "k": method.k,
        "aux_k": method.aux_k,
        "aux_k_coeff": method.aux_k_coeff,
        "dead_window": method.dead_window,
        "init_decoder_norm": method.init_decoder_norm,
        "steps": train_config.steps,
        "batch_size": train_config.batch_size,
        "seed": train_config.seed,
        "lr": train_config.optim.lr,
        "warmup_steps": train_config.optim.warmup_steps,
        "final_lr_fraction": train_config.optim.final_lr_fraction,
        "eval_batch_size": train_config.eval_batch_size,
    }
    problems = [
        f"{key}: train used {SETTINGS[key]!r}, the config (preset and --set) says {value!r}"
        for key, value in resolved.items()
        if SETTINGS[key] != value and key != "steps"
    ]  # steps: below
    fixed = {
        "activation": ("topk", method.activation),
        "schedule": ("cosine", train_config.optim.schedule),
        "decoder_bias_init": ("mean", method.decoder_bias_init),
        "normalise_activations": (True, method.normalise_activations),
        "unit_norm_decoder": (True, method.unit_norm_decoder),
        "weight_decay": (0.0, train_config.optim.weight_decay),
        "penalty": ("none", method.penalty.name),
    }
    problems += [
        f"{key}: the comparison assumes {want!r}, the preset says {got!r}"
        for key, (want, got) in fixed.items()
        if want != got
    ]
    return problems


def outlier_split(dictionary: Any, rows: torch.Tensor) -> dict[str, float]:
    """FVU on a larger sample of cached rows, split into the rare rows of massive norm (> OUTLIER_FACTOR × the
    median norm), which hold much of the variance, and the rest; plus the mean per-row relative error."""
    residuals = torch.cat([(chunk - dictionary(chunk)[0]).square().sum(1).double() for chunk in rows.split(8192)])
    norms = rows.norm(dim=1)
    outliers = norms > OUTLIER_FACTOR * norms.median()
    variance = (rows - rows.mean(0)).square().sum(1).double()
    typical = ~outliers
    typical_variance = (rows[typical] - rows[typical].mean(0)).square().sum(1).double()
    return {
        "fvu_large": float(residuals.sum() / variance.sum()),
        "outlier_rows": int(outliers.sum()),
        "outlier_variance_share": float(variance[outliers].sum() / variance.sum()),
        "outlier_residual_share": float(residuals[outliers].sum() / residuals.sum()),
        "fvu_typical": float(residuals[typical].sum() / typical_variance.sum()),
        "outlier_relative_error": float((residuals[outliers] / norms[outliers].double().square()).mean())
        if bool(outliers.any())
        else float("nan"),
        "typical_relative_error": float((residuals[typical] / norms[typical].double().square()).mean()),
    }


def score(dictionary: Any, source: Any, evaluation: Any, seed: int, eval_batch_size: int) -> dict[str, float]:
    """Training-distribution FVU and L0 on unmerge's own evaluation rows, then the held-out spliced evaluation."""
    from unmerge.metrics import dictionary as scores
    from unmerge.train.rng import step_generator

    dictionary.eval()
    with torch.no_grad():
        rows = source.sample(eval_batch_size, step_generator(seed, "eval"))
        reconstruction, latents, _ = dictionary(rows)
        results = {"fvu": scores.fvu(rows, reconstruction), "l0": scores.l0(latents)}

        def reconstruct(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            reconstruction, latents, _ = dictionary(activations)
            return reconstruction, latents

        results |= outlier_split(dictionary, source.sample(DIAGNOSTIC_ROWS, step_generator(seed, "saelens-comparison")))
        start = time.perf_counter()
        results |= evaluation(reconstruct)
    results["eval_s"] = time.perf_counter() - start
    return results


ROWS = [
    ("fvu", "FVU, training distribution (4,096 cached rows)"),
    ("l0", "L0, training distribution"),
    ("heldout/fvu", "FVU, held-out"),
    ("heldout/l0", "L0, held-out"),
    ("ce_original", "CE original"),
    ("ce_spliced", "CE spliced"),
    ("kl_spliced", "KL spliced"),
    ("ce_recovered_zero", "CE recovered (zero abl.)"),
    ("ce_recovered_mean", "CE recovered (mean abl.)"),
    ("fvu_large", "FVU, training distribution (65,536 cached rows)"),
    ("outlier_rows", f"of which rows with ‖x‖ > {OUTLIER_FACTOR:g}× median"),
    ("outlier_variance_share", "their share of the variance"),
    ("outlier_residual_share", "their share of the squared error"),
    ("fvu_typical", "FVU without them"),
    ("typical_relative_error", "mean ‖x − x̂‖²/‖x‖², typical rows"),
    ("outlier_relative_error", "mean ‖x − x̂‖²/‖x‖², outlier rows"),
    ("dead_latents", "dead latents at the end (training)"),
    ("train_wall_s", "training wall s"),
    ("train_steps_per_s", "training steps/s"),
]


def markdown_table(columns: dict[str, dict[str, float]]) -> str:
    def cell(value: float | None) -> str:
        if value is None:
            return "—"
        return f"{value:.5g}" if isinstance(value, float) else str(value)

    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(values.get(key)) for values in columns.values()) + " |")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from unmerge import api
    from unmerge.data.activation_cache import ActivationCache
    from unmerge.eval.language import spliced_evaluator
    from unmerge.sae.saelens import load_saelens
    from unmerge.targets.language_activations import activation_cache_dir, language_activations

    torch.set_num_threads(args.threads)
    config = api.load_dictionary_config(args.preset, args.set)
    problems = check_settings(config)
    summary = json.loads((args.saelens / "train_summary.json").read_text())
    if summary["steps"] != config.train.steps:
        problems.append(f"steps: SAELens trained {summary['steps']}, the preset says {config.train.steps}")

    saelens_dictionary = load_saelens(args.saelens)
    probe = load_file(str(args.saelens / "probe.safetensors"))
    with torch.no_grad():
        reconstruction, latents, _ = saelens_dictionary.eval()(probe["inputs"])
    probe_error = float((reconstruction - probe["reconstructions"]).abs().max() / probe["reconstructions"].abs().max())
    latent_mismatch = float(((latents != 0) != (probe["latents"] != 0)).any(1).double().mean())
    lr_error = max(
        abs(float(lr) - unmerge_learning_rate(step, summary["steps"])) / SETTINGS["lr"]
        for step, lr in enumerate(probe["learning_rates"])
    )
    print(
        f"export check: max relative reconstruction difference {probe_error:.2e} (unmerge load vs SAELens load), "
        f"rows with another support {latent_mismatch:.4f}; learning rate vs unmerge's schedule: max difference "
        f"{lr_error:.2e} of the peak over {summary['steps']} steps",
        flush=True,
    )
    if probe_error > 1e-4 or lr_error > 1e-6:
        problems.append("the export or the learning-rate schedule does not match (see the line above)")

    recorded = language_activations(config.data)
    source, evaluation = recorded.source, spliced_evaluator(recorded, config.data.eval_tokens)
    cache_dir = activation_cache_dir(config.data)
    if "cache_shards_sha256" in summary:
        if summary["cache_shards_sha256"] != cache_fingerprint(cache_dir):
            problems.append(f"SAELens trained on {summary['cache']}, whose shards differ from {cache_dir}'s")
    elif summary["cache_rows"] != ActivationCache(cache_dir, verify=False).n_tokens:
        problems.append(f"SAELens trained on {summary['cache']} ({summary['cache_rows']} rows), not {cache_dir}")
    columns: dict[str, dict[str, float]] = {}
    unmerge_metrics = None
    if args.unmerge is not None and (args.unmerge / "dictionary.safetensors").is_file():
        run_config, unmerge_dictionary = api.load_dictionary(args.unmerge)
        if run_config.model_dump(exclude={"train": {"threads"}}) != config.model_dump(exclude={"train": {"threads"}}):
            problems.append(
                f"the unmerge run at {args.unmerge} was trained with another config than {args.preset} "
                f"{' '.join(args.set)}"
            )
        print("scoring unmerge's dictionary …", flush=True)
        columns["unmerge"] = score(
            unmerge_dictionary, source, evaluation, config.train.seed, config.train.eval_batch_size
        )
        metrics_path = args.unmerge / "metrics.json"
        if metrics_path.is_file():
            unmerge_metrics = json.loads(metrics_path.read_text())
            columns["unmerge"]["dead_latents"] = unmerge_metrics.get("dead_latents")
            columns["unmerge (its metrics.json)"] = unmerge_metrics
    elif args.unmerge is not None:
        print(
            f"{args.unmerge} holds no finished unmerge run (dictionary.safetensors missing): SAELens only", flush=True
        )
    print("scoring SAELens's dictionary …", flush=True)
    columns["SAELens"] = score(saelens_dictionary, source, evaluation, config.train.seed, config.train.eval_batch_size)
    columns["SAELens"] |= {
        "dead_latents": summary["final_dead"],
        "train_wall_s": summary["wall_s"],
        "train_steps_per_s": summary["steps_per_s"],
    }

    print()
    print(markdown_table(columns))
    print()
    print("| setting | SAELens 6.54 | unmerge |\n|---|---|---|")
    for name, saelens_side, unmerge_side in CONFIG_DIFFERENCES:
        print(f"| {name} | {saelens_side} | {unmerge_side} |")
    print(
        f"\nSAELens run: scale {summary['scaling_factor']:.6g} ({summary['scale_mode']}; unmerge's "
        f"{summary['unmerge_scale']:g}), b_dec start {summary['b_dec_init']}, AuxK coefficient "
        f"{summary.get('aux_coefficient', SETTINGS['aux_k_coeff']):.4g}, gradient clipping "
        f"{'on' if summary.get('grad_clip', True) else 'off'} (norm > 1 on "
        f"{summary.get('clipped_fraction', float('nan')):.1%} of steps, median norm "
        f"{summary.get('grad_norm_median', float('nan')):.3g})"
    )
    if "unmerge" in columns:
        ours, theirs = columns["unmerge"], columns["SAELens"]
        better = [
            key
            for key, lower in (
                ("heldout/fvu", True),
                ("fvu", True),
                ("ce_recovered_zero", False),
                ("ce_recovered_mean", False),
                ("kl_spliced", True),
            )
            if (theirs[key] < ours[key]) == lower and theirs[key] != ours[key]
        ]
        print(
            f"\nL0 held-out: unmerge {ours['heldout/l0']:.3f}, SAELens {theirs['heldout/l0']:.3f}. "
            + (f"SAELens is better on: {', '.join(better)}" if better else "SAELens is better on no metric.")
        )
    if problems:
        print("\nPROBLEMS:\n" + "\n".join(f"- {problem}" for problem in problems))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "columns": columns,
                    "problems": problems,
                    "summary": summary,
                    "probe_error": probe_error,
                    "lr_error": lr_error,
                },
                indent=2,
            )
            + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train the SAELens SAE (run in SAELens's venv)")
    train_parser.add_argument("--cache", type=Path, required=True, help="unmerge activation cache directory")
    train_parser.add_argument("--out", type=Path, required=True, help="where the SAELens export goes")
    train_parser.add_argument("--steps", type=int, default=SETTINGS["steps"], help="fewer for a quick check")
    train_parser.add_argument(
        "--scale",
        choices=("saelens", "power-of-two"),
        default="saelens",
        help="SAELens's exact √d/mean-norm factor, or unmerge's power of two (ablation)",
    )
    train_parser.add_argument(
        "--b-dec-init",
        choices=("mean", "zeros"),
        default="mean",
        help="mean: as unmerge's preset; zeros: SAELens 6's own start",
    )
    train_parser.add_argument(
        "--aux-coefficient",
        type=float,
        default=SETTINGS["aux_k_coeff"],
        help="SAELens's aux_loss_coefficient (default unmerge's 1/32; other values: ablation)",
    )
    train_parser.add_argument(
        "--no-grad-clip",
        action="store_true",
        help="ablation: skip SAETrainer's hard-coded gradient-norm clipping at 1.0",
    )
    train_parser.add_argument("--threads", type=int, default=1)
    compare_parser = commands.add_parser("compare", help="score both with unmerge's evaluation (unmerge's venv)")
    compare_parser.add_argument("--saelens", type=Path, required=True, help="the directory `train` wrote")
    compare_parser.add_argument(
        "--unmerge",
        type=Path,
        default=REPO / "runs" / "smollm2-topk",
        help="the unmerge run of the preset (skipped if not finished)",
    )
    compare_parser.add_argument("--preset", default=PRESET)
    compare_parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, as for the unmerge run (e.g. a smaller test cache)",
    )
    compare_parser.add_argument("--json", type=Path, help="also write every number here")
    compare_parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    {"train": train, "compare": compare}[args.command](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
