"""How APD holds the identity of a TMS+ID target (issue 22: APD fails on the +ID variants; this says how): for each
finished APD run, the component holding most of the `hidden` site's weight, its share of the identity and of
`linear1`, how often batch top-k makes it active on the evaluation inputs that have a feature on, and how many
components such an input gets.

    .venv/bin/python benchmarks/apd_identity.py runs/bench/apd-vs-spd/apd-tms-5-2-id-s0 [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api


def identity_report(run_dir: Path) -> dict[str, object]:
    _, apd, _ = api.load_run(run_dir)
    x = apd.evaluation_batch()
    with torch.no_grad(), apd.model.attached():
        clean = apd.model.clean_pass(x)
        active = apd.active(x, clean, apd.model.inner_acts(clean))
    shares = apd.component_shares("hidden")
    holder = int(shares.argmax())
    with_feature = x.abs().sum(-1) > 0
    return {
        "run": str(run_dir),
        "identity_component": holder,
        "its_share_of_identity": round(float(shares[holder]), 3),
        "its_share_of_linear1": round(float(apd.component_shares("linear1")[holder]), 3),
        "active_on_inputs_with_a_feature": round(float(active[with_feature, holder].float().mean()), 3),
        "inputs_with_a_feature": round(float(with_feature.float().mean()), 3),
        "active_components_per_such_input": round(float(active[with_feature].float().sum(-1).mean()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished APD runs on a TMS+ID target")
    for run_dir in parser.parse_args().runs:
        print(json.dumps(identity_report(run_dir)), flush=True)


if __name__ == "__main__":
    main()
