"""Activations recorded at a module of a trained target, with the target's own input distribution.

Where the target's ground truth stores one direction per feature in that module's output space (TMS: column i of
W is feature i's hidden direction), those directions are the source's true features, so a dictionary on the hidden
activations is scored by the same MMCS as SPD on the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unmerge.data.sparse_features import ActivationSource
from unmerge.errors import UnmergeError
from unmerge.targets.base import Target


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the wanted activations are recorded."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


def _raise_output(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    raise _Captured(output.detach())


def record_activations(target: Target, module: nn.Module, inputs: Tensor) -> Tensor:
    """The output of `module` when `target.model` runs on `inputs`, flattened to (examples, width); the rest of
    the forward pass is skipped."""
    handle = module.register_forward_hook(_raise_output)
    try:
        with torch.no_grad():
            target.model(inputs)
    except _Captured as captured:
        return captured.output.reshape(-1, captured.output.shape[-1])
    finally:
        handle.remove()
    raise UnmergeError(f"the hooked module never ran in {target.name}'s forward pass; choose a module on its path")


def _feature_directions(target: Target, hook: str, module: nn.Module) -> Tensor | None:
    """Feature i's direction in the module's output space, where the ground truth says its weight's input columns
    index the features."""
    truth = target.ground_truth
    if truth is None or truth.feature_directions.get(hook) != "in":
        return None
    weight = getattr(module, "weight", None)
    if weight is None or weight.shape[1] != truth.n_features:
        return None
    return weight.detach().T.clone()


def target_activation_source(target: Target, hook: str) -> ActivationSource:
    """Activations of `target` at the module named `hook`, with true features where the ground truth has them."""
    modules = dict(target.model.named_modules())
    if hook not in modules or not hook:
        names = ", ".join(name for name in modules if name)
        raise UnmergeError(f"{target.name} has no module {hook!r}; hook points: {names}")
    module = modules[hook]
    dim = record_activations(target, module, target.sample_inputs(1, torch.Generator().manual_seed(0))).shape[1]
    return ActivationSource(
        name=f"{target.name}/{hook}",
        dim=dim,
        sample=lambda size, generator: record_activations(target, module, target.sample_inputs(size, generator)),
        true_features=_feature_directions(target, hook, module),
    )
