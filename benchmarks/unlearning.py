"""Unlearning on the residual MLP (issue #5, criterion b): remove the SPD component of feature i permanently and
compare the task error (MSE to the labels x + ReLU(x), over the whole output and on feature i's own output) on
inputs where feature i is active with inputs where it is not, before and after; beside it, the same with the
transcoder's latent for feature i ablated.

    .venv/bin/python benchmarks/unlearning.py runs/bench/resid-mlp-1-s0 --transcoder runs/bench/resid-mlp-1-tc

The SPD run comes from `benchmarks/quality.py resid-mlp-1`; its grouping is (re)computed at the default α
(`unmerge group`) unless `--alpha` says otherwise; feature i's component is the one holding the subcomponents
whose CI on feature i's one-hot input is highest. The transcoder (`resid-mlp-1-transcoder` preset on the SPD
run's own target, trained into --transcoder if missing) must sit on the same trained target; feature i's latent is
the one most active on that one-hot input, and the transcoder's own error (spliced in, nothing ablated) is its
baseline. Prints one JSON line per feature and a summary line (worst cases over the features).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api, runs
from unmerge.analysis.grouping import DEFAULT_ALPHA
from unmerge.analysis.interventions import dictionary_spliced, unlearned_model
from unmerge.config import TargetConfig
from unmerge.sae.dictionary import Dictionary
from unmerge.spd.method import SPD
from unmerge.train.rng import step_generator

INPUTS = 8192


def feature_slices(spd: SPD, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs with feature i active at a uniform value in [−1, 1], the same inputs with feature i off)."""
    x = spd.target.sample_inputs(INPUTS, step_generator(0, "unlearning", feature))
    active = x.clone()
    active[:, feature] = torch.rand(INPUTS, generator=step_generator(1, "unlearning", feature)) * 2 - 1
    inactive = x.clone()
    inactive[:, feature] = 0.0
    return active, inactive


def errors_of(output: torch.Tensor, x: torch.Tensor, feature: int) -> dict[str, float]:
    """MSE to the labels `x + ReLU(x)` over the whole output ("all") and on feature i's own output ("own")."""
    squared = (output - (x + torch.relu(x))).square()
    return {"all": float(squared.mean()), "own": float(squared[:, feature].mean())}


def transcoder_run(directory: Path, spd: SPD, target: TargetConfig) -> Dictionary:
    """The `resid-mlp-1-transcoder` preset's dictionary on the SPD run's own target (`target`, its config) in
    `directory`, trained there first if missing."""
    if not (directory / runs.DICTIONARY_FILE).is_file():
        config = api.load_dictionary_config("resid-mlp-1-transcoder", ["train.threads=1"])
        config = config.model_copy(update={"data": config.data.model_copy(update={"target": target})})
        api.train_dictionary(config, directory)
    return api.load_dictionary_of_target(directory, spd.target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--transcoder", type=Path, required=True)
    parser.add_argument("--features", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the grouping's α (bits per component)")
    args = parser.parse_args()
    grouping = api.group_components(args.run, alpha=args.alpha)
    config, spd, _ = api.load_run(args.run)
    dictionary = transcoder_run(args.transcoder, spd, config.target)
    torch.set_grad_enabled(False)
    model = spd.target.model
    block = model.layers[0]
    rows = []
    for feature in args.features:
        members = [i for i, name in enumerate(grouping.truth) if name == f"feature:{feature}"]
        component = int(grouping.labels[members[0]])
        units = [u for u, label in zip(grouping.units, grouping.labels.tolist(), strict=True) if label == component]
        edited = unlearned_model(spd, units)
        one_hot = torch.zeros(1, model.W_E.shape[0])
        one_hot[0, feature] = spd.target.ground_truth.one_hot_value
        latent = int(dictionary(one_hot @ model.W_E)[1].argmax())
        row: dict[str, object] = {"feature": feature, "component": units, "latent": latent}
        for name, x in zip(("active", "inactive"), feature_slices(spd, feature), strict=True):
            original = model(x)
            errors = {
                "original": errors_of(original, x, feature),
                "spd_removed": errors_of(edited(x), x, feature),
                "spd_output_change": float((edited(x) - original).square().mean()),
            }
            with dictionary_spliced(block, dictionary):
                errors["transcoder"] = errors_of(model(x), x, feature)
            with dictionary_spliced(block, dictionary, latents=[latent]):
                errors["transcoder_latent_ablated"] = errors_of(model(x), x, feature)
            row[name] = errors
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps(summary(rows)))


def summary(rows: list[dict]) -> dict[str, float]:
    """Worst cases over the features: the smallest rise of feature i's own error where it is active, the largest
    relative change of the whole error where it is not, for the SPD removal and the latent ablation."""

    def rise(row: dict, after: str, before: str) -> float:
        return row["active"][after]["own"] / row["active"][before]["own"]

    def change(row: dict, after: str, before: str) -> float:
        return abs(row["inactive"][after]["all"] / row["inactive"][before]["all"] - 1)

    return {
        "features": len(rows),
        "spd_min_own_error_rise": min(rise(r, "spd_removed", "original") for r in rows),
        "spd_max_inactive_error_change": max(change(r, "spd_removed", "original") for r in rows),
        "spd_min_output_change_ratio_active_vs_inactive": min(
            r["active"]["spd_output_change"] / r["inactive"]["spd_output_change"] for r in rows
        ),
        "latent_min_own_error_rise": min(rise(r, "transcoder_latent_ablated", "transcoder") for r in rows),
        "latent_max_inactive_error_change": max(change(r, "transcoder_latent_ablated", "transcoder") for r in rows),
    }


if __name__ == "__main__":
    main()
