"""Group SPD subcomponents into components — mechanisms that may span sites and layers — by greedy merging that
minimises a description length of which groups are active (DESIGN.md §8).

A unit is one subcomponent of one site, named `site/c`. On a sample of inputs (rows: examples, or token
positions of a language model) a unit is active where its causal importance exceeds `threshold`. A grouping's
cost, in bits per input, is

    L = Σ_groups s_i (log2 k + α r_i)     (`unmerge.metrics.description`)

with k groups, s_i the fraction of inputs on which any unit of group i is active, r_i the number of units in it:
naming each active group costs log2 k bits and describing it costs α bits per unit (the precision of one
subcomponent's importance). Merging units that are always active together saves naming bits; merging units
that fire independently costs α bits for every member whenever either fires. Starting from one group per active
unit, the greedy step merges the pair that lowers L most (or raises it least) until one group is left; the
history of merges and costs is kept and the grouping with the lowest L is chosen. Units active on fewer than
`min_active` sampled inputs (default 10) are left out and reported as inactive: their co-activation cannot be
estimated. The default α = 2 is the value that recovers the known mechanisms of the toy runs in BENCHMARKS.md
(`benchmarks/grouping.py` sweeps it); larger α splits more, smaller α merges more.

Memory: the sample's binarised activity, `inputs × units` bytes, is built batch by batch from the CI (the
float importances of the whole sample are never held), and merging keeps one 0/1 column per group (4 bytes per
entry) and the groups' pairwise co-activation (units² floats), so union frequencies are exact on the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unmerge import runs
from unmerge.errors import CheckpointError, ConfigError, UnmergeError
from unmerge.metrics.clustering import adjusted_rand_index
from unmerge.metrics.description import description_length
from unmerge.spd.method import SPD, Importances
from unmerge.train.rng import step_generator

DEFAULT_THRESHOLD = 0.1
DEFAULT_ALPHA = 2.0
DEFAULT_MIN_ACTIVE = 10


@dataclass(frozen=True)
class UnitActivity:
    """Which units are active on each sampled input: `active` (inputs, units) bool over the `units` that fired
    often enough to group; `inactive` names the others."""

    units: list[str]
    active: Tensor
    inactive: list[str]


@dataclass(frozen=True)
class Merge:
    """One greedy step: groups `kept` and `absorbed` (indices of their first units) become one; cost after it."""

    kept: int
    absorbed: int
    cost: float


@dataclass(frozen=True)
class MergeHistory:
    """Every merge from singletons down to one group, the cost before any merge, and the cheapest step."""

    initial_cost: float
    merges: list[Merge]

    @property
    def costs(self) -> list[float]:
        """Cost after 0, 1, 2, ... merges."""
        return [self.initial_cost] + [m.cost for m in self.merges]

    @property
    def best_step(self) -> int:
        costs = self.costs
        return min(range(len(costs)), key=costs.__getitem__)

    def labels(self, n_units: int, step: int | None = None) -> Tensor:
        """Each unit's group (the index of the group's first unit) after `step` merges (default: the best)."""
        parent = torch.arange(n_units)
        for merge in self.merges[: self.best_step if step is None else step]:
            parent[parent == merge.absorbed] = merge.kept
        return parent


def subcomponent_names(spd: SPD) -> list[str]:
    """`site/c` for every subcomponent, in the order of the concatenated CI (`Importances.lower_all`)."""
    return [f"{site}/{c}" for site in spd.model.site_names for c in range(spd.model.site_C[site])]


def active_subcomponents(importances: Importances, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """(rows, subcomponents) bool: CI above `threshold`, rows being inputs or token positions."""
    ci = importances.lower_all.clamp(0.0, 1.0)
    return (ci > threshold).reshape(-1, ci.shape[-1])


@torch.no_grad()
def unit_activity(
    spd: SPD,
    n_inputs: int,
    batch_size: int,
    threshold: float = DEFAULT_THRESHOLD,
    min_active: int = DEFAULT_MIN_ACTIVE,
    seed: int = 0,
) -> UnitActivity:
    """Binarised CI of every subcomponent of every site on `n_inputs` rows of the target's input distribution;
    units active on fewer than `min_active` rows are set aside as inactive."""
    names = subcomponent_names(spd)
    active = torch.zeros(n_inputs, len(names), dtype=torch.bool)
    filled, batch = 0, 0
    while filled < n_inputs:
        x = spd.target.sample_inputs(batch_size, step_generator(seed, "grouping", batch)).to(spd.device)
        rows = active_subcomponents(spd.importances(spd.model.clean_pass(x)), threshold)[: n_inputs - filled].cpu()
        active[filled : filled + rows.shape[0]] = rows
        filled, batch = filled + rows.shape[0], batch + 1
    fired = active.sum(dim=0) >= min_active
    return UnitActivity(
        [n for n, f in zip(names, fired.tolist(), strict=True) if f],
        active[:, fired],
        [n for n, f in zip(names, fired.tolist(), strict=True) if not f],
    )


def _merge_costs(frequency: Tensor, sizes: Tensor, coactive: Tensor, alive: Tensor, alpha: float) -> Tensor:
    """Cost after merging each pair (i, j), i < j, of alive groups (+inf elsewhere), as a (groups, groups) matrix."""
    k = int(alive.sum())
    naming_total = (frequency * alive).sum()
    value_total = (frequency * sizes * alive).sum()
    union = frequency[:, None] + frequency[None, :] - coactive
    merged_size = sizes[:, None] + sizes[None, :]
    naming = naming_total - frequency[:, None] - frequency[None, :] + union
    values = value_total - (frequency * sizes)[:, None] - (frequency * sizes)[None, :] + union * merged_size
    cost = math.log2(k - 1) * naming + alpha * values if k > 1 else torch.full_like(union, math.inf)
    valid = alive[:, None] & alive[None, :] & torch.ones_like(union, dtype=torch.bool).triu(1)
    return torch.where(valid, cost, math.inf)


def greedy_merge(active: Tensor, alpha: float = DEFAULT_ALPHA) -> MergeHistory:
    """Merge groups of units greedily by description length (module docstring) from `active` (inputs, units)."""
    n_inputs, n_units = active.shape
    columns = active.float()
    frequency = columns.mean(0)
    coactive = columns.T @ columns / n_inputs
    sizes = torch.ones(n_units)
    alive = torch.ones(n_units, dtype=torch.bool)
    initial = description_length(frequency, sizes, alpha)
    merges = []
    for _ in range(n_units - 1):
        costs = _merge_costs(frequency, sizes, coactive, alive, alpha)
        flat = int(torch.argmin(costs))
        kept, absorbed = divmod(flat, n_units)
        merges.append(Merge(kept, absorbed, float(costs.view(-1)[flat])))
        columns[:, kept] = torch.maximum(columns[:, kept], columns[:, absorbed])
        alive[absorbed] = False
        sizes[kept] += sizes[absorbed]
        frequency[kept] = columns[:, kept].mean()
        coactive[kept] = coactive[:, kept] = (columns.T @ columns[:, kept]) / n_inputs
    return MergeHistory(initial, merges)


def ground_truth_labels(spd: SPD, units: list[str]) -> list[str] | None:
    """The known mechanism of each of `units` on a toy target (None without ground truth), named `dense:<group>`,
    `feature:<i>` or `unit:<name>`: the units of a dense mechanism's
    sites form one group (e.g. every residual MLP `W_out`, the TMS identity); a unit of a feature site belongs to
    the feature whose one-hot input gives it the highest CI, across sites (feature i's `W` and `Wᵀ` units, or its
    `W_in` unit in whichever layer, form one group), unless no one-hot input gives it CI above `DEFAULT_THRESHOLD`
    (then it serves no single feature); units of other sites stay alone."""
    truth = spd.target.ground_truth
    if truth is None:
        return None
    one_hot = spd.one_hot_importance()
    dense_group = {site: group for group, (sites, _) in truth.dense_sites.items() for site in sites}
    feature_sites = {site for sites in truth.feature_sites.values() for site in sites}
    keys = []
    for unit in units:
        site, index = unit.rsplit("/", 1)
        if site in dense_group:
            keys.append(f"dense:{dense_group[site]}")
        elif site in feature_sites and float(one_hot[site][:, int(index)].max()) > DEFAULT_THRESHOLD:
            keys.append(f"feature:{int(one_hot[site][:, int(index)].argmax())}")
        else:
            keys.append(f"unit:{unit}")
    return keys


@dataclass(frozen=True)
class Grouping:
    """The chosen grouping of a decomposition's active units, its merge history and, on toys, the truth."""

    units: list[str]
    labels: Tensor
    history: MergeHistory
    inactive: list[str]
    settings: dict[str, float]
    truth: list[str] | None

    def components(self) -> list[list[str]]:
        """Groups of unit names, largest first (ties: by first unit)."""
        groups: dict[int, list[str]] = {}
        for unit, label in zip(self.units, self.labels.tolist(), strict=True):
            groups.setdefault(label, []).append(unit)
        return sorted(groups.values(), key=lambda members: (-len(members), self.units.index(members[0])))

    def ari(self, features_only: bool = False) -> float | None:
        """Adjusted Rand index of the chosen grouping against the ground truth (None without one); with
        `features_only`, over the units the truth gives to a feature, so that a large dense group (the residual
        MLP's `W_out`) cannot make up for features that were not joined (None when no unit has a feature)."""
        if self.truth is None:
            return None
        kept = [i for i, name in enumerate(self.truth) if not features_only or name.startswith("feature:")]
        if not kept:
            return None
        truth = [self.truth[i] for i in kept]
        ids = {name: i for i, name in enumerate(dict.fromkeys(truth))}
        return adjusted_rand_index(self.labels[kept], torch.tensor([ids[name] for name in truth]))

    def pure_features(self) -> tuple[int, int]:
        """(features whose units came out as exactly one component with nothing else in it, features the truth
        gives units to)."""
        names = [name for name in dict.fromkeys(self.truth or []) if name.startswith("feature:")]
        return sum(self._pure(name) for name in names), len(names)

    def _pure(self, truth_name: str) -> bool:
        """Whether the units the truth names `truth_name` form exactly one component with nothing else in it."""
        members = torch.tensor([truth == truth_name for truth in self.truth or []])
        components = self.labels[members].unique()
        return len(components) == 1 and int((self.labels == components[0]).sum()) == int(members.sum())

    def dense_mechanisms(self) -> dict[str, dict[str, int | bool]]:
        """Per known dense mechanism (`dense:<group>` in the truth): its active units, how many components they
        fall in, and whether it came out as exactly one component with nothing else in it."""
        results: dict[str, dict[str, int | bool]] = {}
        for name in dict.fromkeys(self.truth or []):
            if not name.startswith("dense:"):
                continue
            members = torch.tensor([truth == name for truth in self.truth])
            results[name.removeprefix("dense:")] = {
                "active_units": int(members.sum()),
                "components": len(self.labels[members].unique()),
                "pure": self._pure(name),
            }
        return results

    def summary(self) -> dict:
        """JSON-ready: settings, costs, the components, ARI against the truth, and the whole merge history."""
        costs = self.history.costs
        components = self.components()
        return {
            "settings": self.settings,
            "active_units": len(self.units),
            "inactive_units": self.inactive,
            "components": components,
            "n_components": len(components),
            "description_length_bits": costs[self.history.best_step],
            "description_length_unmerged_bits": costs[0],
            "merges_chosen": self.history.best_step,
            "adjusted_rand_index": self.ari(),
            "feature_adjusted_rand_index": self.ari(features_only=True),
            "pure_features": dict(zip(("pure", "features"), self.pure_features(), strict=True)),
            "dense_mechanisms": self.dense_mechanisms(),
            "history": [
                {"kept": self.units[m.kept], "absorbed": self.units[m.absorbed], "cost": m.cost}
                for m in self.history.merges
            ],
        }


def check_grouping_settings(n_inputs: int, batch_size: int, threshold: float, alpha: float, min_active: int) -> None:
    """Grouping's settings in range, or a `ConfigError` naming the one that is not."""
    problems = [
        f"{name} {value!r} {rule}"
        for name, value, fits, rule in [
            ("inputs", n_inputs, n_inputs >= 1, "must be at least 1"),
            ("batch size", batch_size, batch_size >= 1, "must be at least 1"),
            ("threshold", threshold, 0.0 <= threshold < 1.0, "must lie in [0, 1) (CI above it is active)"),
            ("alpha", alpha, 0.0 <= alpha < math.inf, "must be a finite number ≥ 0 (bits per active subcomponent)"),
            ("min-active", min_active, min_active >= 0, "must be ≥ 0"),
        ]
        if not fits
    ]
    if problems:
        raise ConfigError(f"grouping: {'; '.join(problems)}")


def group_subcomponents(
    spd: SPD,
    n_inputs: int = 16_384,
    batch_size: int = 1024,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_active: int = DEFAULT_MIN_ACTIVE,
    seed: int = 0,
) -> Grouping:
    """Sample the units' activity, merge greedily, choose the cheapest grouping (module docstring)."""
    check_grouping_settings(n_inputs, batch_size, threshold, alpha, min_active)
    activity = unit_activity(spd, n_inputs, batch_size, threshold, min_active, seed)
    if not activity.units:
        raise UnmergeError(
            f"no subcomponent has CI above {threshold} on {min_active} or more of {n_inputs} "
            "inputs; lower the threshold, sample more inputs or check the run"
        )
    history = greedy_merge(activity.active, alpha)
    settings = {"threshold": threshold, "alpha": alpha, "min_active": min_active, "inputs": n_inputs, "seed": seed}
    return Grouping(
        activity.units,
        history.labels(len(activity.units)),
        history,
        activity.inactive,
        settings,
        ground_truth_labels(spd, activity.units),
    )


def load_grouping(run_dir: Path) -> dict[str, Any]:
    """The `grouping.json` that grouping a run's subcomponents saved in it (`unmerge group`)."""
    path = Path(run_dir) / runs.GROUPING_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {runs.GROUPING_FILE}; run `unmerge group {run_dir}` first")
    fix = f"rerun `unmerge group {run_dir}` to rewrite it"
    grouping = runs.read_json_object(path, fix)
    if not isinstance(grouping.get("components"), list):
        raise CheckpointError(f"{path} lists no components; {fix}")
    return grouping


def component_units(run_dir: Path, components: list[int]) -> list[str]:
    """The subcomponents of the numbered components (0 = the largest) of a run's saved grouping."""
    saved = load_grouping(run_dir)["components"]
    bad = [c for c in components if not 0 <= c < len(saved)]
    if bad:
        raise ConfigError(
            f"component {bad[0]} does not exist: the grouping of {run_dir} has {len(saved)} "
            f"components, numbered 0–{len(saved) - 1}"
        )
    return [unit for c in components for unit in saved[c]]
