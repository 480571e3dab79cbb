"""Reading the mechanisms of an SPD run on a causal language model (DESIGN.md §8): per component — a group of the
run's `grouping.json`, or each alive subcomponent alone when the run has not been grouped — its firing density on
held-out text, the tokens where its causal importance is highest, the exact change of next-token CE when it is
ablated, and the sites it spans.

A component's causal importance at a token is its members' largest; it fires where that exceeds the threshold
(0.1, as grouping counts a unit active). Ablating it removes its subcomponents' weights, `W − Σ U_c V_c` at each
site (`ablated`): with nothing removed the target is exactly itself, so the CE change is measured against the
original model, not the decomposed one, whatever the decomposition's faithfulness. Each ablation is a forward pass
over the windows, so only the `n_ablated` densest components are ablated; the others' change is NaN.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from unmerge.analysis.grouping import DEFAULT_THRESHOLD, subcomponent_names
from unmerge.analysis.interventions import ablated, unit_index
from unmerge.eval.examples import LatentExamples, top_positions
from unmerge.metrics.language import counted_predictions, next_token_nll
from unmerge.spd.method import SPD
from unmerge.targets.language import CausalLM
from unmerge.train.devices import device_of

DEFAULT_ABLATED = 32  # components ablated exactly (one forward pass over the windows each), densest first


@dataclass(frozen=True)
class Mechanisms:
    """Components of an SPD of a causal LM on held-out text. `examples` is per component: its causal importance
    at every token (0 at special tokens), its top positions, and `ablation_effect`, the CE change with it ablated
    (NaN where not ablated); `grouped` says whether the components are the run's grouping or its alive
    subcomponents alone."""

    components: list[list[str]]
    examples: LatentExamples
    density: Tensor
    ce_original: float
    grouped: bool

    def sites(self, component: int) -> dict[str, int]:
        """The sites the component spans, with how many of its subcomponents lie in each."""
        return dict(Counter(unit.rsplit("/", 1)[0] for unit in self.components[component]))


def component_importance(spd: SPD, importance: Tensor, components: list[list[str]]) -> Tensor:
    """(..., components): each component's causal importance, its members' largest, from the subcomponents'
    clipped causal importance (..., ΣC) in `subcomponent_names` order."""
    sizes = torch.tensor([len(members) for members in components])
    owner = torch.full((importance.shape[-1],), len(components), dtype=torch.long)
    owner[unit_index(spd, [unit for members in components for unit in members])] = torch.repeat_interleave(
        torch.arange(len(components)), sizes
    )
    largest = importance.new_zeros(*importance.shape[:-1], len(components) + 1)
    largest.scatter_reduce_(-1, owner.to(importance.device).expand_as(importance), importance, "amax")
    return largest[..., :-1]


@torch.no_grad()
def next_token_ce(model: CausalLM, windows: Tensor, batch_windows: int = 8) -> float:
    """Next-token CE of `model` on `windows`, in nats per counted prediction (special tokens excluded)."""
    total, count = 0.0, 0
    for ids in windows.to(device_of(model)).split(batch_windows):
        nll, predictions = next_token_nll(model(ids), ids, counted_predictions(model.ordinary_positions(ids)))
        total, count = total + float(nll), count + int(predictions)
    return total / max(count, 1)


def read_mechanisms(
    spd: SPD,
    windows: Tensor,
    subcomponents: LatentExamples,
    components: list[list[str]] | None = None,
    per_component: int = 5,
    n_ablated: int = DEFAULT_ABLATED,
    threshold: float = DEFAULT_THRESHOLD,
    batch_windows: int = 8,
) -> Mechanisms:
    """The mechanisms of an SPD of a causal LM on held-out `windows` (module docstring), from its subcomponents'
    causal importance there (`subcomponent_examples`); `components` are the run's grouping, or None for every
    subcomponent that fires on the windows, alone."""
    importance, ordinary = subcomponents.activations, subcomponents.ordinary
    grouped = components is not None
    if components is None:
        alive = (importance[ordinary] > threshold).any(0).tolist()
        components = [[name] for name, fires in zip(subcomponent_names(spd), alive, strict=True) if fires]
    per_token = component_importance(spd, importance, components)
    density = (per_token[ordinary] > threshold).float().mean(0)
    model = spd.target.model
    ce_original = next_token_ce(model, windows, batch_windows)
    change = torch.full((len(components),), float("nan"))
    for k in density.argsort(descending=True, stable=True)[:n_ablated].tolist():
        with ablated(spd, components[k]):
            change[k] = next_token_ce(model, windows, batch_windows) - ce_original
    labels = [str(k) for k in range(len(components))] if grouped else [members[0] for members in components]
    examples = LatentExamples(
        subcomponents.tokens,
        per_token,
        top_positions(per_token, per_component),
        ordinary,
        change,
        "ΔCE",
        labels,
        threshold,
    )
    return Mechanisms(components, examples, density, ce_original, grouped)
