"""Figures of a run (PNG): training curves of every loss term; for SPD and APD on toys, recovered (sub)components
beside the target's weights and CI or attributions on one-hot inputs; for a dictionary, the histogram of its
latents' firing densities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from unmerge import metrics
from unmerge.apd.method import APD
from unmerge.spd.method import SPD
from unmerge.spd.model import ComponentModel

STYLE = {"figure.dpi": 110, "font.size": 9, "axes.titlesize": 9, "image.cmap": "RdBu_r"}


def save_figure(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def as_array(tensor: Tensor) -> np.ndarray:
    """A tensor from any device and dtype (bf16 too) as a float32 NumPy array for plotting."""
    return tensor.detach().to("cpu", torch.float32).numpy()


def permuted_importance(importance: Tensor) -> Tensor:
    """Columns reordered so feature i's matched subcomponent is column i, the unmatched ones after it."""
    if importance.shape[0] > importance.shape[1]:
        return importance[:, importance.mean(0).argsort(descending=True)]
    matched = torch.as_tensor(metrics.identity_permutation(importance))
    rest = [c for c in range(importance.shape[1]) if c not in set(matched.tolist())]
    rest = sorted(rest, key=lambda c: -float(importance[:, c].mean()))
    return importance[:, torch.cat([matched, torch.tensor(rest, dtype=torch.long)])]


def importance_figure(
    one_hot: dict[str, Tensor], path: Path, quantity: str = "CI", units: str = "subcomponent"
) -> Path:
    """One heatmap per site: `quantity` in [0, 1] (features × `units`; SPD's CI, APD's relative attributions) on
    one-hot inputs, permuted towards the identity."""
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, len(one_hot), figsize=(4.2 * len(one_hot), 3.2), squeeze=False)
        for axis, (name, importance) in zip(axes[0], one_hot.items(), strict=True):
            image = axis.imshow(
                as_array(permuted_importance(importance)),
                vmin=0,
                vmax=1,
                cmap="Blues",
                aspect="auto",
                interpolation="nearest",
            )
            axis.set_title(f"{name}: {quantity} on one-hot inputs")
            axis.set_xlabel(f"{units} (permuted)")
            axis.set_ylabel("active feature")
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        return save_figure(figure, path)


def weights_figure(model: ComponentModel, site: str, axis: str, path: Path, rank: int = 1, method: str = "SPD") -> Path:
    """Top: each feature's rank-1 piece of the target weight; bottom: the best-matching component (`rank`
    consecutive subcomponents: 1 for SPD, an APD component's rank)."""
    weight = model.target_weight(site).detach()
    components = model.site_components(site)
    recovery = metrics.feature_recovery(weight, components.U, components.V, axis, rank=rank)
    n_features = len(recovery.best)
    shown = min(n_features, 12)
    unit = "subcomp." if rank == 1 else "comp."
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(2, shown, figsize=(1.3 * shown + 1, 3.2), squeeze=False)
        for i in range(shown):
            piece = torch.zeros_like(weight)
            if axis == "in":
                piece[:, i] = weight[:, i]
            else:
                piece[i, :] = weight[i, :]
            c = int(recovery.best[i])
            pieces = slice(c * rank, (c + 1) * rank)
            component = (components.U[:, pieces] @ components.V[pieces, :]).detach()
            scale = float(piece.abs().max()) or 1.0
            for row, (matrix, title) in enumerate(((piece, f"feature {i}"), (component, f"{unit} {c}"))):
                axes[row, i].imshow(as_array(matrix), vmin=-scale, vmax=scale, interpolation="nearest")
                axes[row, i].set_title(title)
                axes[row, i].set_xticks([])
                axes[row, i].set_yticks([])
        axes[0, 0].set_ylabel("target")
        axes[1, 0].set_ylabel(method)
        figure.suptitle(
            f"{site}: MMCS {recovery.mmcs:.4f}, ML2R {recovery.ml2r:.3f}"
            + (f" (first {shown} of {n_features} features)" if shown < n_features else "")
        )
        return save_figure(figure, path)


def ci_histogram_figure(importances: dict[str, Tensor], path: Path) -> Path:
    """One histogram per site of the causal importances (clipped to [0, 1]) of every subcomponent on every input
    of a batch, log-scaled counts; the title gives the site's CI-L0 at 0.1."""
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, len(importances), figsize=(3.4 * len(importances), 2.6), squeeze=False)
        for axis, (name, values) in zip(axes[0], importances.items(), strict=True):
            axis.hist(as_array(values.flatten()), bins=40, range=(0.0, 1.0), color="#1f77b4")
            axis.set_yscale("log")
            axis.set_title(f"{name}: CI-L0 {metrics.ci_l0(values, 0.1):.3g}")
            axis.set_xlabel("causal importance")
        axes[0, 0].set_ylabel("(input, subcomponent) pairs")
        figure.tight_layout()
        return save_figure(figure, path)


def spd_figures(spd: SPD, directory: Path) -> list[Path]:
    """All figures of an SPD run: CI histograms per site on the evaluation batch; on a toy target also CI on
    one-hot inputs and the recovered weights (those that need ground truth are skipped without it)."""
    paths = [ci_histogram_figure(spd.evaluation_importance(), directory / "ci_histograms.png")]
    truth = spd.target.ground_truth
    if truth is None:
        return paths
    paths.append(importance_figure(spd.one_hot_importance(), directory / "ci_one_hot.png"))
    for site, axis in truth.feature_directions.items():
        if site in spd.model.site_C:
            paths.append(weights_figure(spd.model, site, axis, directory / f"weights_{site}.png"))
    return paths


def apd_figures(apd: APD, directory: Path) -> list[Path]:
    """The figures of an APD run on a toy target (none without ground truth): each feature's attributions over
    the components on one-hot inputs (relative to the feature's largest), and per feature site the best-matching
    component beside the feature's piece of the weight, where a component holding two features shows."""
    truth = apd.target.ground_truth
    if truth is None:
        return []
    one_hot = {"components": apd.one_hot_attributions()}
    paths = [importance_figure(one_hot, directory / "attributions_one_hot.png", "attribution ÷ row max", "component")]
    for site, axis in truth.feature_directions.items():
        if site in apd.ranks:
            path = directory / f"weights_{site}.png"
            paths.append(weights_figure(apd.model, site, axis, path, rank=apd.ranks[site], method="APD"))
    return paths


def training_curves_figure(log_path: Path, path: Path) -> Path | None:
    """Each logged loss term against the step, one panel per term (log scale where positive); None without a
    log."""
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    terms = [key for key in rows[0] if key not in ("step", "lr")] if rows else []
    if not terms:
        return None
    columns = min(3, len(terms))
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(
            math.ceil(len(terms) / columns),
            columns,
            figsize=(3.6 * columns, 2.6 * math.ceil(len(terms) / columns)),
            squeeze=False,
        )
        for axis, term in zip(axes.flat, terms, strict=False):
            points = [(row["step"], row[term]) for row in rows if isinstance(row.get(term), (int, float))]
            steps, values = zip(*points, strict=True) if points else ((), ())
            axis.plot(steps, values, color="#1f77b4", linewidth=1.2)
            if values and min(values) > 0:
                axis.set_yscale("log")
            axis.set_title(term)
            axis.set_xlabel("step")
        for axis in list(axes.flat)[len(terms) :]:
            axis.set_visible(False)
        figure.tight_layout()
    return save_figure(figure, path)


def merge_history_figure(costs: list[float], best_step: int, path: Path) -> Path:
    """Description length after each greedy merge (bits per input), the chosen grouping marked."""
    with plt.rc_context(STYLE):
        figure, axis = plt.subplots(figsize=(5.0, 3.0))
        groups = [len(costs) - step for step in range(len(costs))]
        axis.plot(groups, costs, color="#1f77b4", linewidth=1.2)
        axis.axvline(
            groups[best_step],
            color="#d62728",
            linestyle="--",
            linewidth=1,
            label=f"chosen: {groups[best_step]} components",
        )
        axis.set_xscale("log")
        axis.set_xlabel("components (merging runs right to left)")
        axis.set_ylabel("description length (bits / input)")
        axis.set_title("grouping: merge history")
        axis.legend()
    return save_figure(figure, path)


def density_histogram_figure(density: Tensor, samples: int, path: Path) -> Path:
    """Histogram of log10 firing density (fraction of `samples` inputs where a latent is non-zero) over latents,
    with the latents that never fired counted in the title: dense latents sit at the right, dying ones far left."""
    fired = density[density > 0].double()
    with plt.rc_context(STYLE):
        figure, axis = plt.subplots(figsize=(5.0, 3.0))
        if fired.numel():
            axis.hist(as_array(torch.log10(fired)), bins=50, color="#1f77b4")
        axis.set_xlabel("log10 firing density")
        axis.set_ylabel("latents")
        axis.set_title(
            f"latent density over {samples:,} inputs: {int((density == 0).sum())} of {density.numel()} never fired"
        )
    return save_figure(figure, path)
