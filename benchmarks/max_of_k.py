"""Max-of-K (issue #5, criterion c): the target's accuracy on every input, a width-64 dictionary on its output
logits scored by the purity of each latent for one value of the maximum, and SPD of its attention weights —
how many subcomponents and components, and what each subcomponent reads and writes.

    .venv/bin/python benchmarks/max_of_k.py --spd runs/bench/max-of-k-s0 --dictionary runs/bench/max-of-k-logits

(`unmerge decompose max-of-k --out runs/bench/max-of-k-s0` and `unmerge train-dictionary max-of-k-logits --out
runs/bench/max-of-k-logits` first.) Purity of a latent: the largest share of its activation mass on inputs with
one value of the maximum (`metrics.dictionary.latent_purity`), on 65,536 sampled inputs. For each alive SPD
subcomponent c (CI > 0.1 on some input), its mean CI at the last position and: for q, k, v (which read the
residual stream) the Pearson correlation between the token value t and what c reads from t's embedding,
`(W_E[t] + pos) · V_c` at the last position; for o (which writes the residual stream) the correlation between v
and what c writes to the logit of v, `U_c · W_U[v]`. A "size" direction (attend to the largest token) reads
monotonically in t. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unmerge import api, runs
from unmerge.metrics.dictionary import latent_purity
from unmerge.targets.algorithmic import max_of_k_accuracy
from unmerge.train.rng import step_generator

SAMPLE = 65_536


def correlation(values: torch.Tensor, profile: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([values.double(), profile.double()]))[0, 1])


def spd_report(run: Path) -> list[dict[str, object]]:
    config, spd, _ = api.load_run(run)
    model = spd.target.model
    x = spd.target.sample_inputs(8192, step_generator(0, "max-of-k-report"))
    with torch.no_grad():
        importance = spd.importances(spd.model.clean_pass(x)).clipped()
        tokens = torch.arange(model.embed.num_embeddings)
        residual = model.embed.weight + model.pos_embed[-1]
        rows = []
        for site in spd.model.site_names:
            components = spd.model.site_components(site)
            last = importance[site][:, -1]
            alive = (importance[site] > 0.1).reshape(-1, last.shape[-1]).any(0)
            for c in torch.nonzero(alive).flatten().tolist():
                row = {"site": site, "subcomponent": c, "mean_ci_last": round(float(last[:, c].mean()), 4)}
                if site.endswith(("q_proj", "k_proj", "v_proj")):
                    row["read_vs_token"] = round(correlation(tokens, residual @ components.V[c]), 3)
                else:
                    row["write_vs_value"] = round(correlation(tokens, model.unembed.weight @ components.U[:, c]), 3)
                rows.append(row)
    grouping = api.group_components(run)
    sizes = [len(members) for members in grouping.components()]
    summary = {
        "spd": str(run),
        "alive": {s: sum(r["site"] == s for r in rows) for s in spd.model.site_names},
        "components": len(sizes),
        "component_sizes": sizes,
        "ci_masked_kl": json.loads((run / runs.METRICS_FILE).read_text())["ci_masked_recon"],
    }
    return [summary] + sorted(rows, key=lambda r: (r["site"], -r["mean_ci_last"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spd", type=Path, required=True)
    parser.add_argument("--dictionary", type=Path, required=True)
    args = parser.parse_args()
    config, spd, _ = api.load_run(args.spd)
    print(json.dumps({"target": config.name, **max_of_k_accuracy(spd.target.model, config.target)}), flush=True)
    dictionary = api.load_dictionary_of_target(args.dictionary, spd.target)
    x = spd.target.sample_inputs(SAMPLE, step_generator(0, "max-of-k-purity"))
    with torch.no_grad():
        latents = dictionary(spd.target.model(x))[1]
    purity, label = latent_purity(latents, x.max(1).values, config.target.d_vocab)
    alive = ~torch.isnan(purity)
    pure = alive & (purity > 0.9)
    print(
        json.dumps(
            {
                "dictionary": str(args.dictionary),
                "width": latents.shape[1],
                "alive": int(alive.sum()),
                "mean_purity": float(purity[alive].mean()),
                "median_purity": float(purity[alive].median()),
                "latents_purity_above_0.9": int(pure.sum()),
                "max_values_with_a_pure_latent": len(set(label[pure].tolist())),
                "fvu": json.loads((args.dictionary / runs.METRICS_FILE).read_text())["fvu"],
            }
        ),
        flush=True,
    )
    for row in spd_report(args.spd):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
