"""Your own two-layer MLP on your own data: train it, decompose both weights with SPD, look at what came out.

    .venv/bin/python examples/own_mlp.py            # about 15 seconds on one laptop CPU core
    .venv/bin/python examples/own_mlp.py --steps 50 # seconds (what the test suite runs)

The model learns to copy 12 sparse features through a 6-wide hidden layer (more features than dimensions, the
superposition SPD is built to undo); SPD should find one subcomponent per feature in each weight.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import unmerge

FEATURES, HIDDEN = 12, 6


def sparse_features(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Each feature on with probability 0.05, with a value in [0, 1)."""
    values = torch.rand(rows, FEATURES, generator=generator)
    return values * (torch.rand(rows, FEATURES, generator=generator) < 0.05)


def trained_mlp(data: torch.Tensor, steps: int) -> nn.Module:
    """A ReLU MLP fitted to reproduce its input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN, bias=False), nn.ReLU(), nn.Linear(HIDDEN, FEATURES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (256,))]
        loss = (model(batch) - batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main(argv: list[str] | None = None) -> unmerge.Decomposition:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="SPD steps (the MLP trains for as many)")
    args = parser.parse_args(argv)
    data = sparse_features(20_000, torch.Generator().manual_seed(0))
    model = trained_mlp(data, args.steps)

    found = unmerge.decompose(
        model,
        data,  # a tensor of inputs; a list or DataLoader of batches works too
        sites={"0": 20, "2": 20},  # module names as model.named_modules() gives them, and C per site
        steps=args.steps,
        batch_size=512,
        importance_minimality_coeff=3e-3,
        optim={"lr": 1e-3, "schedule": "cosine"},
    )
    print(found)
    print({name: round(value, 4) for name, value in found.final_metrics.items() if "/" not in name})
    one_feature = torch.zeros(1, FEATURES)
    one_feature[0, 3] = 1.0
    importance = found.causal_importance(one_feature)["0"][0]
    print("subcomponents of layer 0 that feature 3 needs:", (importance > 0.5).nonzero().flatten().tolist())
    components = found.components(n_inputs=4096)
    print(f"{len(components)} components; the largest spans {components[0].sites}")
    edited = found.ablate(components[0])
    change = (edited(data[:1000]) - model(data[:1000])).square().mean() / model(data[:1000]).square().mean()
    print(f"removing it changes the output by {float(change):.3f} of its mean square")
    return found


if __name__ == "__main__":
    main()
