"""Short runs of every dictionary architecture and of SPD (with its optional terms) whose metrics must not move
when code is reorganised: one JSON line per run with every metric. Compare two commits with

    .venv/bin/python benchmarks/against_commit.py REF --rounds 1 --script-from-working-tree benchmarks/fingerprint.py

(every `ratio_now_to_earlier` is then 1.0 where behaviour is unchanged; NaN metrics are printed as null).
It uses only the public `unmerge.api`, so the same script runs against earlier commits. About 2 minutes.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from unmerge import api

WIDTH_256 = ["method.width=256", "train.eval_batch_size=1024"]
DICTIONARIES = {
    "relu-l1": ("sparse-512-relu-l1", ["train.steps=150", *WIDTH_256]),
    "relu-resample": ("sparse-512-relu-l1-resample", ["train.steps=150", *WIDTH_256, "method.resample_every=50"]),
    "topk": ("sparse-512-topk", ["train.steps=150", *WIDTH_256]),
    "batchtopk": (
        "sparse-512-topk",
        ["train.steps=150", *WIDTH_256, "method.activation=batchtopk", "method.aux_k=null"],
    ),
    "jumprelu": (
        "sparse-512-relu-l1",
        [
            "train.steps=150",
            *WIDTH_256,
            "method.activation=jumprelu",
            "method.penalty.name=none",
            "method.l0_coeff=0.03",
        ],
    ),
    "gated": (
        "sparse-512-relu-l1",
        ["train.steps=150", *WIDTH_256, "method.activation=gated", "method.normalise_activations=true"],
    ),
    "matryoshka": ("hierarchy-matryoshka", ["train.steps=300"]),
    "transcoder-skip": ("resid-mlp-1-transcoder", ["train.steps=100", "method.skip=true"]),
    "tms-hidden": ("tms-5-2-hidden", ["train.steps=200"]),
}
DECOMPOSITIONS = {
    "spd-resid-mlp-1": ("resid-mlp-1", ["train.steps=30", "train.batch_size=256", "train.eval_batch_size=512"]),
    "spd-tms-5-2-id": (
        "tms-5-2-id",
        [
            "train.steps=100",
            "train.batch_size=512",
            "train.eval_batch_size=512",
            "method.adversarial_steps=2",
            "method.adversarial_recon_coeff=0.5",
            "method.importance_frequency_coeff=0.01",
            "method.faithfulness_warmup_steps=20",
        ],
    ),
}


def _line(run: str, metrics: dict[str, float]) -> str:
    finite = {
        key: value if not (isinstance(value, float) and math.isnan(value)) else None for key, value in metrics.items()
    }
    return json.dumps({"benchmark": "fingerprint", "run": run, **finite})


def main() -> None:
    root = Path(tempfile.mkdtemp())
    for run, (preset, overrides) in DICTIONARIES.items():
        result = api.train_dictionary(api.load_dictionary_config(preset, overrides), root / run)
        print(_line(run, result.metrics), flush=True)
    for run, (preset, overrides) in DECOMPOSITIONS.items():
        result = api.decompose(api.load_run_config(preset, overrides), root / run)
        print(_line(run, result.metrics), flush=True)


if __name__ == "__main__":
    main()
