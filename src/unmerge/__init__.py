"""unmerge: decompose trained neural networks into the mechanisms they compute.

Public API (the CLI is a thin shell over `unmerge.api`; this is the notebook-first surface)::

    import torch, unmerge
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    found = unmerge.decompose(model, torch.randn(1024, 8), sites={"0": 20, "2": 20}, steps=200)
    found.causal_importance(torch.randn(4, 8))       # per site: (4, 20) in [0, 1]
    found.components()                               # subcomponents grouped into mechanisms
    found.save("runs/mine")                          # the run directory `unmerge decompose` writes

    unmerge.Decomposition.load("runs/tms")           # any SPD run, from the command line or from here
    sae = unmerge.train_dictionary(model, hook="0", data=torch.randn(1024, 8), width=64)
    sae.encode(activations); sae.to_saelens("runs/sae")
"""

from unmerge.api import evaluate, load_run, load_run_config, preset_names, train_target_preset
from unmerge.config import RunConfig, SPDConfig, TrainConfig
from unmerge.errors import UnmergeError
from unmerge.notebook.decomposition import Component, Decomposition, Subcomponents, decompose
from unmerge.notebook.dictionary import Dictionary, train_dictionary

__all__ = [
    "Component",
    "Decomposition",
    "Dictionary",
    "RunConfig",
    "SPDConfig",
    "Subcomponents",
    "TrainConfig",
    "UnmergeError",
    "decompose",
    "evaluate",
    "load_run",
    "load_run_config",
    "preset_names",
    "train_dictionary",
    "train_target_preset",
]
