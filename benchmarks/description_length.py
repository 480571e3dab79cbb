"""Description length of SPD against dictionaries on the same model (issue #5, criterion f): bits per input to
name the active units and give their values (`unmerge.metrics.description`), beside the reconstruction each
achieves, measured the same way for both — the FVU of the model's output when the model runs on the
decomposition's active units only, against the original output.

    .venv/bin/python benchmarks/description_length.py --spd runs/bench/tms-40-10-s0 \\
        --dictionaries runs/sweep-tms-40-10-hidden/runs/coeff=*
    .venv/bin/python benchmarks/description_length.py --spd runs/bench/resid-mlp-1-s0 \\
        --dictionaries runs/bench/resid-mlp-1-tc

SPD: units are subcomponents of every site with CI > 0.1; the model described runs with masks = CI on those and
0 elsewhere. Its grouped cost uses the grouping `unmerge group` chooses at the same α. Dictionary: units are the
latents that fire; the model described has the dictionary spliced in at its module. The same 16,384 sampled inputs
for all; α = 2 and 8 bits per unit value. Prints one JSON line per decomposition.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api
from unmerge.analysis.grouping import active_subcomponents, group_subcomponents
from unmerge.analysis.interventions import dictionary_spliced, unit_index
from unmerge.metrics import dictionary as dictionary_metrics
from unmerge.metrics.description import activity_description_length
from unmerge.spd.method import SPD
from unmerge.train.rng import step_generator

INPUTS = 16_384
THRESHOLD = 0.1
ALPHAS = (2.0, 8.0)


def spd_row(spd: SPD, x: torch.Tensor) -> dict[str, object]:
    clean = spd.model.clean_pass(x)
    importance = spd.importances(clean)
    masks = {name: g * (g > THRESHOLD) for name, g in importance.clipped().items()}
    output = spd.model.masked_pass(x, masks, clean, importance.inner)
    active = active_subcomponents(importance, THRESHOLD)
    row: dict[str, object] = {
        "units": active.shape[1],
        "l0": float(active.sum(1).float().mean()),
        "output_fvu": dictionary_metrics.fvu(clean.output, output),
    }
    for alpha in ALPHAS:
        row[f"bits_alpha{alpha:g}"] = activity_description_length(active, alpha)
        grouping = group_subcomponents(spd, INPUTS, 1024, THRESHOLD, alpha, min_active=1)
        positions = torch.tensor(unit_index(spd, grouping.units))
        labels = torch.arange(active.shape[1])  # inactive subcomponents stay alone
        labels[positions] = positions[grouping.labels]
        row[f"bits_grouped_alpha{alpha:g}"] = activity_description_length(active, alpha, labels)
    return row


def dictionary_row(run: Path, spd: SPD, x: torch.Tensor) -> dict[str, object]:
    config, _ = api.load_dictionary(run)
    dictionary = api.load_dictionary_of_target(run, spd.target)
    model = spd.target.model
    module = dict(model.named_modules())[config.data.hook]
    latents: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda m, i, o: latents.append(dictionary(i[0] if dictionary.transcoder else o)[1])
    )
    original = model(x)
    handle.remove()
    with dictionary_spliced(module, dictionary):
        output = model(x)
    active = latents[0].reshape(-1, latents[0].shape[-1]) > 0
    row: dict[str, object] = {
        "units": active.shape[1],
        "l0": float(active.sum(1).float().mean()),
        "output_fvu": dictionary_metrics.fvu(original, output),
    }
    for alpha in ALPHAS:
        row[f"bits_alpha{alpha:g}"] = activity_description_length(active, alpha)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spd", type=Path, required=True)
    parser.add_argument("--dictionaries", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    _, spd, _ = api.load_run(args.spd)
    x = spd.target.sample_inputs(INPUTS, step_generator(0, "description-length"))
    with torch.no_grad():
        print(json.dumps({"decomposition": f"SPD {args.spd}", **spd_row(spd, x)}), flush=True)
        for run in args.dictionaries:
            print(json.dumps({"decomposition": f"dictionary {run}", **dictionary_row(run, spd, x)}), flush=True)


if __name__ == "__main__":
    main()
