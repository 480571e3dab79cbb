"""The units section of a report on a language model: every dictionary latent (or SPD subcomponent) that is
active on the held-out text, its density, largest activation (causal importance) and estimated ablation effect,
and its top-activating snippets with each token shaded by it (the strongest token marked); a filter box and
sortable columns."""

from __future__ import annotations

import html

import torch

from unmerge.eval.examples import LatentExamples
from unmerge.report.html import SORT_SCRIPT

BEFORE, AFTER = 10, 4  # tokens of context shown before and after the top-activating token
FILTER_SCRIPT = """
document.getElementById("latent-filter").addEventListener("input", event => {
  const query = event.target.value.trim().toLowerCase(), byNumber = /^[0-9]+$/.test(query);
  document.querySelectorAll("#latents tbody tr").forEach(row => {
    const name = row.dataset.latent;
    const shown = !query || (byNumber ? name === query || name.endsWith("/" + query)
                                      : row.lastElementChild.textContent.toLowerCase().includes(query));
    row.style.display = shown ? "" : "none";
  });
});
"""
STYLE = """
.snippet { font-family: ui-monospace, monospace; font-size: 0.85em; margin: 2px 0; white-space: pre-wrap; }
.tok { border-radius: 2px; } .tok.max { outline: 1px solid #000; }
"""


def _token(text: str, activation: float, peak: float, strongest: bool) -> str:
    shade = 0.0 if peak <= 0 else max(0.0, min(1.0, activation / peak))
    shown = html.escape(text.replace("\n", "⏎"))
    return (
        f'<span class="tok{" max" if strongest else ""}" data-activation="{activation:.4g}" '
        f'title="{activation:.4g}" style="background: rgba(214, 39, 40, {shade:.2f})">{shown}</span>'
    )


def _snippet(examples: LatentExamples, latent: int, flat: int, peak: float) -> str:
    seq = examples.activations.shape[1]
    window, position = divmod(flat, seq)
    start, stop = max(0, position - BEFORE), min(seq, position + AFTER + 1)
    values = examples.activations[window, start:stop, latent].tolist()
    tokens = examples.tokens[window][start:stop]
    spans = "".join(
        _token(text, value, peak, start + i == position)
        for i, (text, value) in enumerate(zip(tokens, values, strict=True))
    )
    return f'<div class="snippet">{spans}</div>'


def latents_section(
    examples: LatentExamples,
    max_latents: int = 2000,
    title: str = "Latents",
    unit: str = "latent",
    measure: str = "activation",
) -> str:
    """HTML: the units (dictionary latents, or SPD subcomponents with `measure` "causal importance") active on
    the held-out windows, densest first (at most `max_latents`)."""
    flat = examples.activations[examples.ordinary]
    active = flat > examples.threshold
    density = active.float().mean(0)
    peaks = flat.max(0).values
    active_units = int((density > 0).sum())
    order = [int(j) for j in torch.argsort(density, descending=True)[: min(active_units, max_latents)]]
    windows_by_seq = examples.activations.reshape(-1, flat.shape[1])
    rows = []
    for latent in order:
        peak = float(peaks[latent])
        snippets = "".join(
            _snippet(examples, latent, int(flat_index), peak)
            for flat_index in examples.top[:, latent]
            if windows_by_seq[flat_index, latent] > examples.threshold
        )
        label = html.escape(str(latent) if examples.names is None else examples.names[latent])
        effect = "—" if examples.ablation_effect is None else f"{float(examples.ablation_effect[latent]):.3g}"
        rows.append(
            f'<tr data-latent="{label}"><td>{label}</td><td class=value>{float(density[latent]):.4g}</td>'
            f"<td class=value>{peak:.4g}</td><td class=value>{effect}</td><td>{snippets}</td></tr>"
        )
    return f"""<style>{STYLE}</style>
<h2>{html.escape(title)}</h2>
<p>{active_units} {unit}s are active on {int(examples.ordinary.sum())} held-out tokens ({int((density == 0).sum())} are
not; density is the fraction of tokens where the {measure} exceeds {examples.threshold:g}); the {len(order)} densest
are listed. Each snippet is centred
on one of the {unit}'s most activating tokens (outlined); shading is the {measure} relative to its largest. The
ablation effect is how much the loss ({html.escape(examples.effect_name)} on this text) would rise with the {unit}
zeroed wherever it acts, estimated to first order from one backward pass (attribution patching); negative means
it hurts. Type a number to show that {unit}, or text to show the {unit}s whose snippets contain it; click a header
to sort.</p>
<p><input id="latent-filter" placeholder="filter: {unit} number or snippet text" size="40"></p>
<table id="latents" class="sortable"><thead><tr><th>{unit}</th><th>density</th><th>max {measure}</th>
<th>ablation effect</th><th>top-activating snippets</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{SORT_SCRIPT}{FILTER_SCRIPT}</script>
"""
