"""How APD holds the identity of a TMS+ID target (issue 22: APD fails on the +ID variants; this says how): for each
finished APD run, every component holding more than a tenth of the `hidden` site's weight (its share of the
identity and of `linear1`, and how often batch top-k makes it active on the evaluation inputs that have a feature
on), how many components such an input gets, and on how many of them none of the identity's holders is active.

    .venv/bin/python benchmarks/apd_identity.py runs/bench/apd-vs-spd/apd-tms-5-2-id-s0 [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api

HOLDS = 0.1  # a component holds part of the identity when its matrix there is this share of the identity's norm


def identity_report(run_dir: Path) -> dict[str, object]:
    _, apd, _ = api.load_run(run_dir)
    x = apd.evaluation_batch()
    with torch.no_grad(), apd.model.attached():
        clean = apd.model.clean_pass(x)
        active = apd.active(x, clean, apd.model.inner_acts(clean))
    identity, features = apd.component_shares("hidden"), apd.component_shares("linear1")
    holders = (identity > HOLDS).nonzero().flatten()
    holders = holders[identity[holders].argsort(descending=True)]
    with_feature = x.abs().sum(-1) > 0
    on_feature_inputs = active[with_feature].float()
    return {
        "run": str(run_dir),
        "identity_holders": [
            {
                "component": int(c),
                "share_of_identity": round(float(identity[c]), 3),
                "share_of_linear1": round(float(features[c]), 3),
                "active_on_inputs_with_a_feature": round(float(on_feature_inputs[:, c].mean()), 3),
            }
            for c in holders
        ],
        "inputs_with_a_feature": round(float(with_feature.float().mean()), 3),
        "active_components_per_such_input": round(float(on_feature_inputs.sum(-1).mean()), 3),
        "such_inputs_without_an_identity_holder": round(
            float((on_feature_inputs[:, holders].sum(-1) == 0).float().mean()), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished APD runs on a TMS+ID target")
    for run_dir in parser.parse_args().runs:
        print(json.dumps(identity_report(run_dir)), flush=True)


if __name__ == "__main__":
    main()
