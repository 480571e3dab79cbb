"""The handlers of `unmerge`'s commands: each reads its parsed arguments, calls one `unmerge.api` function and
prints what a person wants to see."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unmerge import api
from unmerge.config import Override, parse_overrides
from unmerge.errors import UnmergeError

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
    """The command line's `key=value` overrides, parsed once, then the flags that name a config key."""
    flags = {
        "train.seed": args.seed,
        "train.steps": args.steps,
        "target.train.seed": getattr(args, "target_seed", None),
        "target.n_features": getattr(args, "n_features", None),
        "target.n_hidden": getattr(args, "n_hidden", None),
        "target.identity": getattr(args, "identity", None),
    }
    return parse_overrides(args.overrides) + [
        Override.of(key, value) for key, value in flags.items() if value is not None
    ]


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
    if summary["feature_adjusted_rand_index"] is not None:
        pure = summary["pure_features"]
        print(
            f"over the features' subcomponents alone: {summary['feature_adjusted_rand_index']:.4f}; "
            f"{pure['pure']} of {pure['features']} features came out as one component of their own"
        )
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


def _run_directory(args: argparse.Namespace) -> Path:
    if args.out is None:
        raise UnmergeError("--out is required to train (it is the run directory); or pass --dry-run")
    return args.out
