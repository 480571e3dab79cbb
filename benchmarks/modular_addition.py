"""Modular addition (issue #5, criterion d): the target's train and test accuracy (it groks), the key Fourier
frequencies of its embedding, and whether SPD's subcomponents are per-frequency.

    .venv/bin/python benchmarks/modular_addition.py --spd runs/bench/modular-addition-s0

(`unmerge decompose modular-addition --out runs/bench/modular-addition-s0` first; its target is trained on first
use.) Key frequencies: the fewest frequencies k of the embedding's discrete Fourier transform over the p number
tokens holding 90% of its power (`unmerge.targets.algorithmic.key_frequencies`). Per alive subcomponent c (CI >
0.1 on some input) of a site that reads the token embedding — the embedding itself (what c writes for token t is
`U_c V_c[t]`, so its profile over t is `V_c[t]`) and the MLP input (its profile is what it reads from t's
embedding at position 0, `(W_E[t] + pos_0) · V_c`) — the frequency holding most of the profile's power and that
share. Per-frequency structure: most subcomponents put most of their power in one key frequency. Prints JSON
lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api
from unmerge.targets.algorithmic import key_frequencies, modular_addition_accuracy
from unmerge.train.rng import step_generator


def dominant_frequency(profile: torch.Tensor) -> tuple[int, float]:
    """(k, share): the non-constant frequency with the most power in a profile over the p tokens, and its share."""
    power = torch.fft.rfft(profile.double()).abs().square()[1:]
    k = int(power.argmax())
    return k + 1, float(power[k] / power.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spd", type=Path, required=True)
    args = parser.parse_args()
    config, spd, _ = api.load_run(args.spd)
    model, p = spd.target.model, config.target.p
    keys = key_frequencies(model.embed.weight.detach(), p)
    print(
        json.dumps(
            {
                "target": config.name,
                **modular_addition_accuracy(model, config.target),
                "key_frequencies": [[k, round(share, 3)] for k, share in keys],
            }
        ),
        flush=True,
    )
    key_set = {k for k, _ in keys}
    x = spd.target.sample_inputs(4096, step_generator(0, "modular-addition-report"))
    with torch.no_grad():
        importance = spd.importances(spd.model.clean_pass(x)).clipped()
        residual = model.embed.weight[:p] + model.pos_embed[0]
        for site in spd.model.site_names:
            if site not in ("embed", "mlp.fc_in"):
                continue
            components = spd.model.site_components(site)
            alive = torch.nonzero((importance[site] > 0.1).reshape(-1, components.V.shape[0]).any(0)).flatten()
            profiles = components.V[alive, :p] if site == "embed" else (residual @ components.V[alive].T).T
            found = [dominant_frequency(profile) for profile in profiles]
            on_key = [share for k, share in found if k in key_set]
            print(
                json.dumps(
                    {
                        "site": site,
                        "alive": len(found),
                        "on_a_key_frequency": len(on_key),
                        "median_share_of_dominant_frequency": float(torch.tensor([s for _, s in found]).median())
                        if found
                        else None,
                        "dominant_frequencies": sorted({k for k, _ in found}),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
