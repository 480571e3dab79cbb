"""Induction heads (issue 24, point 3): does SPD find the previous-token and the induction mechanism of a two-layer
attention-only transformer, checked by ablation and by attention patterns?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/induction.py --out runs/bench/induction
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/induction.py --preset induction-two-tasks --out DIR

trains the preset's target (cached), decomposes its attention weights with the preset (or reuses a
finished run in `--out`), groups the subcomponents (`unmerge group`) and prints JSON lines: the target's
in-context accuracy and head scores; SPD's metrics and the in-context accuracy with every subcomponent masked by
its causal importance (with the previous-token task, that task's too and each site's CI-L0 on each task's
positions); then, on 2,048 fresh sequences, the in-context accuracy, the previous-token score of
layer 0 and the induction score of layer 1 (`unmerge.targets.induction`) with nothing zero-ablated, with the
previous-token mechanism ablated (the target has one head per layer, so: every active subcomponent of the
layer-0 sites, active meaning CI > 0.1 on 10 or more of the 16,384 positions grouping samples), the induction
mechanism (those of the layer-1 sites), both, and the rest (every inactive subcomponent; what stays is the two
mechanisms and the residual W − U V); grouping's candidates for the two mechanisms (the component holding most
of layer 0's active subcomponents, the one holding most of layer 1's, when they differ), both together and every
subcomponent outside them; with the previous-token task, also the two mechanisms as the tasks define them
(`task_mechanisms`: the components the previous-token task uses, those only the induction task uses) and everything
outside both; then with each component of the grouping ablated alone. Chance is 1 / the
induction task's vocabulary; `copy_chance` is the accuracy of guessing uniformly among the tokens seen so far,
what a model that copies some earlier token gets. A target with the previous-token task (`induction-two-tasks`)
adds that task's accuracy to every row, and, for each component, the share of each layer's active subcomponents
it holds and the share of each task's positions on which it fires (any member's CI > 0.1). The grouping line
gives its adjusted Rand index against the heads (the truth: each subcomponent belongs to its layer's head);
`--alpha` sets grouping's α.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api, runs
from unmerge.analysis.grouping import DEFAULT_ALPHA, DEFAULT_THRESHOLD, subcomponent_names
from unmerge.analysis.interventions import ablated
from unmerge.metrics.clustering import adjusted_rand_index
from unmerge.metrics.importance import ci_l0
from unmerge.spd.method import SPD, Importances
from unmerge.spd.records import CleanPass
from unmerge.targets.induction import (
    copy_chance,
    in_context_accuracy,
    induction_metrics,
    induction_scores,
    induction_task_positions,
    previous_token_accuracy,
    previous_token_positions,
    previous_token_scores,
)
from unmerge.train.rng import step_generator

SEQUENCES = 2048
USES = 0.5  # a task uses a component that fires on at least this share of its positions
SPD_METRICS = ("faithfulness_relative", "stochastic_recon", "ci_masked_recon", "unmasked_recon", "ci_l0/0.1")


def scores(spd: SPD, ids: torch.Tensor, units: list[str]) -> dict[str, float]:
    """In-context accuracy, the two head scores (head 0 of each layer) and, with the previous-token task, its
    accuracy, with `units` zero-ablated."""
    with ablated(spd, units):
        logits, patterns, _ = spd.target.model.run(ids)
    row = {
        "accuracy": round(in_context_accuracy(logits, ids), 4),
        "previous_token_score_layer0": round(float(previous_token_scores(patterns[0], ids)[0]), 4),
        "induction_score_layer1": round(float(induction_scores(patterns[1], ids)[0]), 4),
    }
    if previous_token_positions(ids, logits.shape[-1]).any():
        row["previous_token_task_accuracy"] = round(previous_token_accuracy(logits, ids), 4)
    return row


def task_positions(ids: torch.Tensor, d_vocab: int) -> dict[str, torch.Tensor]:
    """(batch, seq) bool per task: the induction task's positions (BOS excluded) and, in a target with it, the
    previous-token task's."""
    second = previous_token_positions(ids, d_vocab)
    if not second.any():
        return {}
    return {"induction_task": induction_task_positions(ids, d_vocab), "previous_token_task": second}


def ci_masked(spd: SPD, ids: torch.Tensor, clean: CleanPass, importances: Importances) -> dict[str, object]:
    """In-context accuracy (and the previous-token task's) of the decomposed model with every subcomponent masked by
    its causal importance; with the previous-token task, each site's CI-L0 at 0.1 per position on each task's
    positions."""
    with torch.no_grad():
        logits = spd.model.masked_pass(ids, importances.lower, clean, importances.inner)
    row: dict[str, object] = {"ci_masked_accuracy": round(in_context_accuracy(logits, ids), 4)}
    tasks = task_positions(ids, logits.shape[-1])
    if tasks:
        row["ci_masked_previous_token_task_accuracy"] = round(previous_token_accuracy(logits, ids), 4)
    for task, positions in tasks.items():
        row[f"ci_l0_on_{task}"] = {site: round(ci_l0(ci[positions]), 2) for site, ci in importances.clipped().items()}
    return row


def firing(active: torch.Tensor, tasks: dict[str, torch.Tensor], members: list[int]) -> dict[str, float]:
    """Per task, the share of its positions on which any of `members` (columns of `active`, (batch, seq, units)
    bool) is active: a component of one mechanism fires on the tasks that use it and not on the others."""
    fires = active[..., members].any(-1)
    return {f"fires_on_{task}": round(float(fires[positions].float().mean()), 3) for task, positions in tasks.items()}


def task_mechanisms(components: list[list[str]], firings: list[dict[str, float]]) -> dict[str, list[str]]:
    """The two mechanisms as the tasks define them, whichever layers and however many components each spans. A task
    uses a component that fires on at least half of its positions (`USES`). The previous-token task needs the
    previous-token head alone, so every component it uses is the previous-token mechanism; the induction task needs
    both heads, so the components it uses and the other task does not are the induction mechanism; components
    neither task uses are the rest. Returns the units of each mechanism."""
    mechanisms: dict[str, list[str]] = {"previous_token_task_components": [], "induction_task_components": []}
    for members, fires in zip(components, firings, strict=True):
        if fires["fires_on_previous_token_task"] >= USES:
            mechanisms["previous_token_task_components"] += members
        elif fires["fires_on_induction_task"] >= USES:
            mechanisms["induction_task_components"] += members
    return mechanisms


def layers(units: list[str]) -> list[int]:
    """The layers whose sites hold `units` (`blocks.L.attn.x_proj/c`)."""
    return sorted({int(unit.split(".")[1]) for unit in units})


def per_layer(units: list[str], n_layers: int) -> list[int]:
    """How many of `units` each layer's sites hold."""
    held = [layers([unit])[0] for unit in units]
    return [held.count(layer) for layer in range(n_layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the SPD run directory (trained there if unfinished)")
    parser.add_argument("--preset", default="induction", help="an induction preset (default: induction)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="grouping's α (`unmerge group`'s default)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of the preset")
    args = parser.parse_args()
    if not runs.is_finished(args.out):
        config = api.load_run_config(args.preset, args.overrides)
        if config.target.kind != "induction":
            raise SystemExit(f"{args.preset} is not an induction preset (its target is {config.target.kind})")
        api.decompose(config, args.out)
    config, spd, _ = api.load_run(args.out)
    target = config.target
    print(json.dumps({"target": config.name, **induction_metrics(spd.target.model, target)}), flush=True)
    metrics = runs.read_metrics(args.out)
    ids = spd.target.sample_inputs(SEQUENCES, step_generator(0, "induction-benchmark"))
    with torch.no_grad():
        clean = spd.model.clean_pass(ids)
        importances = spd.importances(clean)
    spd_row = {"spd": str(args.out), **{name: metrics[name] for name in SPD_METRICS}}
    print(json.dumps({**spd_row, **ci_masked(spd, ids, clean, importances)}), flush=True)
    tasks = task_positions(ids, target.d_vocab)
    fired = importances.lower_all > DEFAULT_THRESHOLD
    column = {name: i for i, name in enumerate(subcomponent_names(spd))}

    grouping = api.group_components(args.out, alpha=args.alpha)
    components = grouping.components()
    firings = [firing(fired, tasks, [column[unit] for unit in members]) for members in components]
    previous = [unit for unit in grouping.units if layers([unit]) == [0]]
    induction = [unit for unit in grouping.units if layers([unit]) == [1]]
    rest = sorted(set(subcomponent_names(spd)) - set(grouping.units))
    layers_of = [layers([unit])[0] for unit in grouping.units]
    print(
        json.dumps(
            {
                "active_subcomponents": len(grouping.units),
                "per_site": {
                    site: sum(u.startswith(site + "/") for u in grouping.units) for site in spd.model.site_names
                },
                "components": len(components),
                "ari_against_heads": round(float(adjusted_rand_index(grouping.labels, torch.tensor(layers_of))), 3),
                "component_sizes": [len(members) for members in components],
            }
        ),
        flush=True,
    )
    chances = {"chance": 1 / target.induction_vocabulary, "copy_chance": round(copy_chance(ids), 4)}
    print(json.dumps(chances), flush=True)
    ablations = {
        "nothing": [],
        "previous_token_mechanism": previous,
        "induction_mechanism": induction,
        "both_mechanisms": previous + induction,
        "rest": rest,
    }
    matched = [max(components, key=lambda members: len(set(members) & set(head))) for head in (previous, induction)]
    if matched[0] is not matched[1]:  # grouping's candidates for the two mechanisms, and what is outside them
        ablations["previous_token_component"], ablations["induction_component"] = matched
        ablations["both_components"] = both = matched[0] + matched[1]
        ablations["outside_both_components"] = sorted(set(subcomponent_names(spd)) - set(both))
    if tasks:
        ablations.update(by_task := task_mechanisms(components, firings))
        kept = {unit for units in by_task.values() for unit in units}
        ablations["outside_both_task_mechanisms"] = sorted(set(column) - kept)
    n_layers = len(spd.target.model.blocks)
    for name, units in ablations.items():
        row = {"ablated": name, "subcomponents": len(units), "per_layer": per_layer(units, n_layers)}
        print(json.dumps({**row, **scores(spd, ids, units)}), flush=True)
    for index, members in enumerate(components):
        row = {"component": index, "subcomponents": len(members), "layers": layers(members)}
        for layer, active in enumerate((previous, induction)):
            row[f"share_of_layer{layer}"] = round(len(set(members) & set(active)) / max(len(active), 1), 3)
        print(json.dumps({**row, **firings[index], **scores(spd, ids, members)}), flush=True)


if __name__ == "__main__":
    main()
