"""The mechanisms section of an SPD report on a causal language model (`unmerge.analysis.mechanisms`): every
component, densest first, with its subcomponents, the sites it spans, its firing density, largest causal
importance, CE change when ablated and top snippets with the peak token outlined, as a sortable table (template
`report/templates/mechanisms.html`). The same numbers go to `mechanisms.json` in the run directory, each snippet as
text with its peak token in [[ ]]."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from markupsafe import Markup
from torch import Tensor

from unmerge import runs
from unmerge.analysis.grouping import load_grouping
from unmerge.analysis.mechanisms import DEFAULT_ABLATED, Mechanisms, read_mechanisms
from unmerge.eval.examples import LatentExamples
from unmerge.io import write_json_atomic
from unmerge.report.html import render
from unmerge.report.latents import snippet
from unmerge.spd.method import SPD

MECHANISMS_FILE = "mechanisms.json"


def mechanism_rows(mechanisms: Mechanisms) -> list[dict[str, Any]]:
    """Per component, densest first: its label, subcomponents, sites (with their subcomponent counts), density,
    largest causal importance, CE change when ablated (None where not ablated) and its top positions above the
    threshold, each with its window, position, causal importance and snippet (`snippet`'s tokens)."""
    examples = mechanisms.examples
    seq = examples.activations.shape[1]
    by_position = examples.activations.reshape(-1, examples.activations.shape[-1])
    peaks = by_position.max(0).values
    rows = []
    for k in mechanisms.density.argsort(descending=True, stable=True).tolist():
        peak, change = float(peaks[k]), float(examples.ablation_effect[k])
        top = [int(i) for i in examples.top[:, k] if by_position[i, k] > examples.threshold]
        rows.append(
            {
                "component": examples.names[k],
                "members": mechanisms.components[k],
                "sites": mechanisms.sites(k),
                "density": float(mechanisms.density[k]),
                "max_ci": peak,
                "ce_change": None if math.isnan(change) else change,
                "top": [
                    {
                        "window": i // seq,
                        "position": i % seq,
                        "ci": float(by_position[i, k]),
                        "snippet": snippet(examples, k, i, peak),
                    }
                    for i in top
                ],
            }
        )
    return rows


def _text(tokens: list[dict[str, object]]) -> str:
    """A snippet as plain text, its strongest token in [[ ]]."""
    return "".join(f"[[{token['text']}]]" if token["strongest"] else str(token["text"]) for token in tokens)


def mechanisms_section(
    spd: SPD,
    windows: Tensor,
    subcomponents: LatentExamples,
    run_dir: Path,
    n_ablated: int = DEFAULT_ABLATED,
    max_rows: int = 256,
) -> Markup:
    """For an SPD of a whole causal LM: its mechanisms on the held-out `windows` (`read_mechanisms`, from the
    subcomponents' examples there; the components of the run's `grouping.json` if it has one), written to
    `mechanisms.json` in `run_dir` and returned as the report's section (at most `max_rows` components)."""
    components = load_grouping(run_dir)["components"] if (run_dir / runs.GROUPING_FILE).is_file() else None
    mechanisms = read_mechanisms(spd, windows, subcomponents, components, n_ablated=n_ablated)
    rows = mechanism_rows(mechanisms)
    source = (
        f"the components of {runs.GROUPING_FILE}, numbered as `unmerge unlearn --component` takes them"
        if mechanisms.grouped
        else f"every alive subcomponent alone (the run has no {runs.GROUPING_FILE}: `unmerge group` it)"
    )
    threshold, tokens = mechanisms.examples.threshold, int(mechanisms.examples.ordinary.sum())
    summary = {
        "components_from": source,
        "threshold": threshold,
        "tokens": tokens,
        "ce_original": mechanisms.ce_original,
        "ce_change": (
            "next-token CE (nats per counted prediction, special tokens excluded) of the original model with the "
            f"component's weights removed, minus the original model's; for the {n_ablated} densest, null for others"
        ),
        "components": [row | {"top": [top | {"snippet": _text(top["snippet"])} for top in row["top"]]} for row in rows],
    }
    write_json_atomic(run_dir / MECHANISMS_FILE, summary, indent=1)
    return render(
        "mechanisms.html",
        rows=rows[:max_rows],
        components=len(rows),
        source=source,
        tokens=tokens,
        threshold=f"{threshold:g}",
        ce_original=f"{mechanisms.ce_original:.4g}",
        ablated=min(n_ablated, len(rows)),
    )
