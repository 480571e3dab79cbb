"""How many layers compute each feature of a multi-layer residual MLP (issue #2, criterion c): on the one-hot input
x_i = 0.75, the share of the MLPs' effect on feature i's own output that is lost when one layer's MLP is removed.

    .venv/bin/python benchmarks/resid_mlp_layers.py resid-mlp-2 resid-mlp-3

A rank-1 subcomponent lives in one weight matrix, so a feature that loses a real share of its computation without
either of two layers needs a `W_in` subcomponent in each of them: no decomposition into rank-1 subcomponents gives
it exactly one across layers. Prints one JSON line per preset.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge import api
from unmerge.targets import cached_target
from unmerge.targets.resid_mlp import ResidMLP


def own_output_errors(model: ResidMLP, x: Tensor, removed: int | None) -> Tensor:
    """Squared error of each one-hot input's own output against `x + ReLU(x)`, with layer `removed`'s MLP output
    set to zero (none removed when None)."""
    hooks = (
        []
        if removed is None
        else [model.layers[removed].register_forward_hook(lambda _module, _inputs, output: torch.zeros_like(output))]
    )
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return (out.diagonal() - (x + F.relu(x)).diagonal()) ** 2


def layer_shares(model: ResidMLP, n_features: int, value: float = 0.75) -> Tensor:
    """(layers, features): the share of the MLPs' effect on feature i's own error lost without layer l."""
    x = value * torch.eye(n_features)
    full = own_output_errors(model, x, None)
    with torch.no_grad():
        no_mlp = ((x @ model.W_E @ model.W_E.T).diagonal() - (x + F.relu(x)).diagonal()) ** 2
    return torch.stack(
        [(own_output_errors(model, x, layer) - full) / (no_mlp - full) for layer in range(len(model.layers))]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    args = parser.parse_args()
    for preset in args.presets:
        config = api.load_run_config(preset)
        model = cached_target(config.target).model
        shares = layer_shares(model, config.target.n_features)
        summary = {
            f"features_needing_2_layers_at_{threshold:g}": int(((shares >= threshold).sum(0) >= 2).sum())
            for threshold in (0.05, 0.1, 0.2)
        }
        print(
            json.dumps(
                {
                    "benchmark": "resid_mlp_layers",
                    "preset": preset,
                    "features": config.target.n_features,
                    "median_share_lost_per_layer": [round(v, 3) for v in shares.median(1).values.tolist()],
                    **summary,
                }
            )
        )


if __name__ == "__main__":
    main()
