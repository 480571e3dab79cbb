"""What each of the TMS+ID identity's pieces adds on each one-hot input, beside its causal importance there: shows
that a piece with CI ≈ 0 on a feature is one that carries almost nothing of the identity's output on it.

    .venv/bin/python benchmarks/identity_shares.py runs/bench/robust/tms-5-2-id-rule/*/t*-s0 [RUN ...]

Share of piece c on feature i: ‖U_c‖·|V_c·h_i| / ‖h_i‖, h_i the identity's input (= its output) on the one-hot input
x_i = 0.75. Prints one JSON line per run: the live pieces' entries with CI < 0.1, between 0.1 and 0.9, and > 0.9,
and the shares in the first and the last group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api

SITE = "hidden"


def identity_shares(run_dir: Path) -> dict[str, object]:
    """The identity's one-hot CI and each live piece's share of the output, summarised."""
    _, spd, step = api.load_run(run_dir)
    with torch.no_grad():
        importance = spd.one_hot_importance()[SITE]
        h = spd.model.clean_pass(spd.target.one_hot_inputs(spd.device)).site_inputs[SITE]
        pieces = spd.model.site_components(SITE)
        share = (h @ pieces.V.T).abs() * pieces.U.norm(dim=0) / h.norm(dim=1, keepdim=True)
    live = (importance > 0.1).any(0)
    importance, share = importance[:, live].cpu(), share[:, live].cpu()
    off, on = importance < 0.1, importance > 0.9

    def summary(values: torch.Tensor) -> dict[str, float] | None:
        if values.numel() == 0:
            return None
        return {
            "min": round(float(values.min()), 3),
            "median": round(float(values.median()), 3),
            "max": round(float(values.max()), 3),
        }

    return {
        "run": str(run_dir),
        "step": step,
        "live": int(live.sum()),
        "entries": importance.numel(),
        "ci_below_0.1": int(off.sum()),
        "ci_between": int((~off & ~on).sum()),
        "share_where_ci_below_0.1": summary(share[off]),
        "share_where_ci_above_0.9": summary(share[on]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    for run_dir in parser.parse_args().runs:
        print(json.dumps(identity_shares(run_dir)), flush=True)


if __name__ == "__main__":
    main()
