"""What each of the TMS+ID identity's pieces adds on each one-hot input, beside its causal importance there: shows
that a piece with CI ≈ 0 on a feature is one that carries almost nothing of the identity's output on it; and what
SPD's own loss says of the dense pattern (every live identity piece at CI 1 on every input with a feature on).

    .venv/bin/python benchmarks/identity_shares.py runs/bench/id/tms-5-2-id-s0 [RUN ...]

Share of piece c on feature i: ‖U_c‖·|V_c·h_i| / ‖h_i‖, h_i the identity's input (= its output) on the one-hot input
x_i = 0.75. Prints one JSON line per run: the live pieces' entries with CI < 0.1, between 0.1 and 0.9, and > 0.9,
the shares in the first and the last group, and the weighted training loss terms on the evaluation batch (mean over
`DRAWS` mask draws) with the learned CI and with the identity's live pieces forced to 1 at the same weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api
from unmerge.spd.method import SPD, Importances
from unmerge.spd.model import CleanPass

SITE = "hidden"
DRAWS = 16


def identity_shares(run_dir: Path) -> dict[str, object]:
    """The identity's one-hot CI and each live piece's share of the output, summarised."""
    config, spd, step = api.load_run(run_dir)
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
        "loss_learned": rounded(loss_terms(spd, config.train.steps, dense=None)),
        "loss_dense": rounded(loss_terms(spd, config.train.steps, dense=live.to(spd.device))),
    }


def rounded(values: dict[str, float]) -> dict[str, float]:
    """To four significant digits, for printing."""
    return {name: float(f"{value:.4g}") for name, value in values.items()}


def loss_terms(spd: SPD, total_steps: int, dense: torch.Tensor | None) -> dict[str, float]:
    """SPD's weighted loss terms and its loss (`total`) on its evaluation batch, averaged over `DRAWS` mask draws;
    with `dense` (bool per identity piece), those pieces' CI set to 1 (lower and upper) on every input that has a
    feature on."""
    x = spd.evaluation_batch()
    learned = spd.importances

    def importances(clean: CleanPass) -> Importances:
        ci = learned(clean)
        if dense is None:
            return ci
        used = (x != 0).any(-1, keepdim=True)
        lower, upper = ci.lower_all.clone(), ci.upper_all.clone()
        for values in (lower, upper):
            site = spd.model.split_sites(values)[SITE]
            site.copy_(torch.where(used & dense, torch.ones_like(site), site))
        return Importances(ci.inner, lower, upper, spd.model.split_sites(lower))

    coefficients = spd.config.model_dump()
    spd.begin_step(total_steps, total_steps)
    spd.importances = importances  # type: ignore[method-assign]  # the loss reads its CI through this method
    totals: dict[str, float] = {"total": 0.0}
    try:
        with torch.no_grad():
            for draw in range(DRAWS):
                output = spd.training_loss(x, torch.Generator(spd.device).manual_seed(draw))
                totals["total"] += float(output.loss) / DRAWS
                for name, value in output.terms.items():
                    weighted = coefficients[f"{name}_coeff"] * float(value)
                    totals[name] = totals.get(name, 0.0) + weighted / DRAWS
    finally:
        spd.importances = learned  # type: ignore[method-assign]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    for run_dir in parser.parse_args().runs:
        print(json.dumps(identity_shares(run_dir)), flush=True)


if __name__ == "__main__":
    main()
