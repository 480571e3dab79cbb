"""Feature splitting across dictionaries of growing width: the comparison of finished runs, its figures and a
markdown section."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from unmerge.analysis.splitting import SplitPair, Splits, best_matches, splitting_pairs, truth_names
from unmerge.errors import ConfigError
from unmerge.io import write_json_atomic, write_text_atomic
from unmerge.report.figures import STYLE, as_array, save_figure
from unmerge.sae.storage import load_dictionary
from unmerge.targets.sources import activation_source
from unmerge.train.rng import step_generator

R2_FLOOR = -1.0  # the children figure draws lower R² here


def cosine_figure(splits: Splits, title: str, path: Path) -> Path:
    """Decoder cosines, parents × children, each child column placed under its most similar parent."""
    order = torch.argsort(splits.cosine.argmax(0) * 2.0 - splits.cosine.max(0).values, stable=True)
    with plt.rc_context(STYLE):
        figure, axis = plt.subplots(
            figsize=(min(12.0, 2 + 0.08 * splits.cosine.shape[1]), min(8.0, 1.5 + 0.08 * splits.cosine.shape[0]))
        )
        image = axis.imshow(as_array(splits.cosine[:, order]), vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        axis.set_xlabel("child latent (grouped by most similar parent)")
        axis.set_ylabel("parent latent")
        axis.set_title(title)
        figure.colorbar(image, ax=axis, shrink=0.8, label="decoder cosine")
    return save_figure(figure, path)


def children_figure(splits: Splits, title: str, path: Path) -> Path:
    """Per parent latent: its number of children (bars) and the R² of its reconstruction from them (dots; values
    below −1, from parents that barely fire, are drawn at −1 so the rest stay readable)."""
    counts = [len(kids) for kids in splits.children]
    with plt.rc_context(STYLE):
        figure, axis = plt.subplots(figsize=(min(12.0, 2 + 0.12 * len(counts)), 3.0))
        axis.bar(range(len(counts)), counts, color="#9ecae1", label="children")
        axis.set_xlabel("parent latent")
        axis.set_ylabel("children")
        r2 = axis.twinx()
        clipped = splits.reconstruction_r2.clamp(min=R2_FLOOR)
        r2.plot(range(len(counts)), as_array(clipped), "o", color="#d62728", markersize=3, label="R² from children")
        r2.set_ylim(min(0.0, float(torch.nan_to_num(clipped, nan=1.0).min())) - 0.05, 1.05)
        below = bool((splits.reconstruction_r2 < R2_FLOOR).any())
        r2.set_ylabel("R² of the parent from its children" + (" (below −1 drawn at −1)" if below else ""))
        axis.set_title(title)
    return save_figure(figure, path)


def markdown_section(
    pairs: list[SplitPair], figures: list[Path], threshold: float, matches: list[list[str]] | None = None
) -> str:
    """The report section: per width pair, summary numbers, the children table and the figures; with `matches`
    (per dictionary, smallest first, each latent's closest true feature) the table names what each latent is."""
    lines = [
        "## Feature splitting",
        "",
        f"Children: child latents with decoder cosine > {threshold:g} to the parent's; R²: the parent's "
        "activation predicted from what its children write, projected on its decoder; shared: split vectors "
        "on a direction that splits two or more parents (cosine > 0.5)."
        + (" Each latent is named by the true feature its decoder is closest to, with the cosine." if matches else ""),
        "",
    ]
    for pair, (split_pair, pair_figures) in enumerate(zip(pairs, _chunks(figures, 2), strict=True)):
        small, large, splits, shared = split_pair.small, split_pair.large, split_pair.splits, split_pair.shared
        counts = [len(kids) for kids in splits.children]
        r2 = splits.reconstruction_r2[~torch.isnan(splits.reconstruction_r2)]
        lines += [
            f"### {small} → {large}",
            "",
            f"- parents with 0 / 1 / ≥ 2 children: {counts.count(0)} / {counts.count(1)} / "
            f"{sum(c >= 2 for c in counts)}",
            f"- median R² of a parent from its children: {float(r2.median()) if r2.numel() else math.nan:.3f}",
            f"- split vectors: {shared.split_vectors.shape[0]}; on shared directions: {shared.shared_fraction():.3f}",
            "",
            "| parent | fires | children (cosine) | R² |",
            "|---|---|---|---|",
        ]
        for row in splits.table():
            parent, kids = str(row["parent"]), [str(c) for c in row["children"]]
            if matches is not None:
                parent += f" = {matches[pair][row['parent']]}"
                kids = [f"{c} = {matches[pair + 1][int(c)]}" for c in kids]
            kids = ", ".join(f"{c} ({cos:.2f})" for c, cos in zip(kids, row["cosines"], strict=True))
            lines.append(f"| {parent} | {row['frequency']:.3f} | {kids or '—'} | {row['r2']:.3f} |")
        lines += [""] + [f"![{path.stem}]({path.name})" for path in pair_figures] + [""]
    return "\n".join(lines)


def _chunks(items: list[Path], size: int) -> list[list[Path]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def write_splitting(
    out_dir: Path,
    pairs: list[SplitPair],
    widths: list[int],
    parent_runs: list[str],
    threshold: float,
    matches: list[list[str]] | None = None,
) -> tuple[list[Path], Path]:
    """Per pair, its cosine and children figures; `splitting.json` (every parent's children, per pair) and
    `splitting.md` (the report section) in `out_dir`. `widths` are the dictionaries' (smallest first) and
    `parent_runs` their run directories. Returns the figures and the markdown's path."""
    figures, table = [], []
    for pair, small_width, large_width, small_run, large_run in zip(
        pairs, widths, widths[1:], parent_runs, parent_runs[1:], strict=False
    ):
        title, stem = f"{pair.small} → {pair.large}", f"{small_width}-to-{large_width}"
        figures += [
            cosine_figure(pair.splits, f"{title}: decoder cosines", out_dir / f"cosine-{stem}.png"),
            children_figure(pair.splits, f"{title}: children", out_dir / f"children-{stem}.png"),
        ]
        table.append(
            {
                "parent_run": small_run,
                "child_run": large_run,
                "threshold": threshold,
                "shared_fraction": pair.shared.shared_fraction(),
                "atom_parents": pair.shared.atom_parents(),
                "parents": pair.splits.table(),
            }
        )
    write_json_atomic(out_dir / "splitting.json", table, indent=1)
    write_text_atomic(out_dir / "splitting.md", markdown_section(pairs, figures, threshold, matches))
    return figures, out_dir / "splitting.md"


@dataclass(frozen=True)
class SplittingResult:
    """Feature splitting across dictionary runs (by width): per consecutive pair, the runs' names, the splits and
    the shared-direction fit; the figures and the markdown section written to `out_dir`."""

    out_dir: Path
    pairs: list[SplitPair]
    figures: list[Path]
    markdown: Path


def feature_splitting(
    run_dirs: list[Path], out_dir: Path, threshold: float = 0.5, n_inputs: int = 16_384
) -> SplittingResult:
    """Compare finished dictionary runs of growing width on the same data (`unmerge.analysis.splitting`): each
    smaller dictionary's latents against the next larger one's, on `n_inputs` sampled activations. Writes
    `splitting.json`, `splitting.md` (a report section) and figures to `out_dir`."""
    if len(run_dirs) < 2:
        raise ConfigError("feature splitting compares at least two dictionary runs of different widths")
    loaded = sorted(((Path(r), *load_dictionary(r)) for r in run_dirs), key=lambda run: run[2].W_d.shape[0])
    data = loaded[0][1].data
    for run_dir, config, _ in loaded[1:]:
        if config.data != data:
            raise ConfigError(
                f"{run_dir} was trained on other data than {loaded[0][0]}; feature splitting compares "
                "dictionaries of the same activations"
            )
    source = activation_source(data)
    activations = source.sample(n_inputs, step_generator(0, "splitting"))[:, : source.dim]
    widths = [dictionary.W_d.shape[0] for _, _, dictionary in loaded]
    named = [
        (f"{run_dir.name} ({width})", dictionary)
        for (run_dir, _, dictionary), width in zip(loaded, widths, strict=True)
    ]
    pairs = splitting_pairs(named, activations, threshold)
    matches = None
    if source.true_features is not None:
        names = truth_names(source.true_features, source.parents)
        matches = [best_matches(dictionary, source.true_features, names) for _, _, dictionary in loaded]
    out_dir = Path(out_dir)
    figures, markdown = write_splitting(
        out_dir, pairs, widths, [str(run_dir) for run_dir, _, _ in loaded], threshold, matches
    )
    return SplittingResult(out_dir, pairs, figures, markdown)
