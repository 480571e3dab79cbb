"""unmerge: decompose trained neural networks into the mechanisms they compute.

Public API (the CLI is a thin shell over it)::

    from unmerge import load_run_config, decompose, evaluate
    result = decompose(load_run_config("tms-5-2", ["train.steps=3000"]), "runs/tms")
    result.metrics["mmcs"]
"""

from unmerge.api import decompose, evaluate, load_run, load_run_config, preset_names, train_target_preset
from unmerge.config import RunConfig, SPDConfig, TrainConfig
from unmerge.errors import UnmergeError

__all__ = [
    "RunConfig",
    "SPDConfig",
    "TrainConfig",
    "UnmergeError",
    "decompose",
    "evaluate",
    "load_run",
    "load_run_config",
    "preset_names",
    "train_target_preset",
]
