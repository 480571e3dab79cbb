"""The units section of a report on a language model: every dictionary latent (or SPD subcomponent) that is
active on the held-out text, its density, largest activation (causal importance) and estimated ablation effect,
and its top-activating snippets with each token shaded by it (the strongest token marked); a filter box and
sortable columns (template `report/templates/latents.html`)."""

from __future__ import annotations

import torch
from markupsafe import Markup

from unmerge.eval.examples import LatentExamples
from unmerge.report.html import render

BEFORE, AFTER = 10, 4  # tokens of context shown before and after the top-activating token


def _token(text: str, activation: float, peak: float, strongest: bool) -> dict[str, object]:
    shade = 0.0 if peak <= 0 else max(0.0, min(1.0, activation / peak))
    return {
        "text": text.replace("\n", "⏎"),
        "activation": f"{activation:.4g}",
        "shade": f"{shade:.2f}",
        "strongest": strongest,
    }


def snippet(examples: LatentExamples, latent: int, flat: int, peak: float) -> list[dict[str, object]]:
    """The tokens around flat position `flat` (windows × seq) for unit `latent`, shaded by its activation relative to
    `peak`, that position marked strongest."""
    seq = examples.activations.shape[1]
    window, position = divmod(flat, seq)
    start, stop = max(0, position - BEFORE), min(seq, position + AFTER + 1)
    values = examples.activations[window, start:stop, latent].tolist()
    tokens = examples.tokens[window][start:stop]
    return [
        _token(text, value, peak, start + i == position)
        for i, (text, value) in enumerate(zip(tokens, values, strict=True))
    ]


def latents_section(
    examples: LatentExamples,
    max_latents: int = 2000,
    title: str = "Latents",
    unit: str = "latent",
    measure: str = "activation",
) -> Markup:
    """The units (dictionary latents, or SPD subcomponents with `measure` "causal importance") active on the
    held-out windows, densest first (at most `max_latents`), as markup for `write_run_report`'s `sections`."""
    flat = examples.activations[examples.ordinary]
    density = (flat > examples.threshold).float().mean(0)
    peaks = flat.max(0).values
    active_units = int((density > 0).sum())
    order = [int(j) for j in torch.argsort(density, descending=True)[: min(active_units, max_latents)]]
    windows_by_seq = examples.activations.reshape(-1, flat.shape[1])
    rows = []
    for latent in order:
        peak = float(peaks[latent])
        snippets = [
            snippet(examples, latent, int(flat_index), peak)
            for flat_index in examples.top[:, latent]
            if windows_by_seq[flat_index, latent] > examples.threshold
        ]
        effect = "—" if examples.ablation_effect is None else f"{float(examples.ablation_effect[latent]):.3g}"
        rows.append(
            {
                "label": str(latent) if examples.names is None else examples.names[latent],
                "density": f"{float(density[latent]):.4g}",
                "peak": f"{peak:.4g}",
                "effect": effect,
                "snippets": snippets,
            }
        )
    return render(
        "latents.html",
        title=title,
        unit=unit,
        measure=measure,
        rows=rows,
        active=active_units,
        tokens=int(examples.ordinary.sum()),
        inactive=int((density == 0).sum()),
        threshold=f"{examples.threshold:g}",
        effect_name=examples.effect_name,
    )
