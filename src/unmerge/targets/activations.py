"""Activations recorded at a module of a trained target, with the target's own input distribution.

Where the target has ground truth, feature i's true direction at the module is how the module's output moves when
feature i alone is on (TMS: column i of W, so a dictionary on the hidden activations is scored by the same MMCS as
SPD on the weights). A transcoder source records the module's input beside its output (a residual MLP's block: the
residual stream in, what the MLP writes out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.data.source import ActivationSource
from unmerge.errors import UnmergeError
from unmerge.targets.base import Target


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the wanted activations are recorded."""

    def __init__(self, inputs: Tensor, output: Tensor) -> None:
        super().__init__()
        self.inputs = inputs
        self.output = output


def _raise_activations(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor | tuple) -> None:
    raise _Captured(inputs[0].detach(), (output[0] if isinstance(output, tuple) else output).detach())


def capture_module(model: nn.Module, module: nn.Module, inputs: Tensor, model_name: str) -> tuple[Tensor, Tensor]:
    """(first input, output) of `module` when `model` runs on `inputs`, as the module sees them (a tuple output
    gives its first element); the rest of the forward pass is skipped."""
    handle = module.register_forward_hook(_raise_activations)
    try:
        with torch.no_grad():
            model(inputs)
    except _Captured as captured:
        return captured.inputs, captured.output
    finally:
        handle.remove()
    raise UnmergeError(f"the hooked module never ran in {model_name}'s forward pass; choose a module on its path")


def _module_activations(target: Target, module: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(first input, output) of `module` when `target.model` runs on `inputs`, each flattened to (examples,
    width)."""
    module_input, output = capture_module(target.model, module, inputs, target.name)
    return module_input.reshape(-1, module_input.shape[-1]), output.reshape(-1, output.shape[-1])


def record_activations(target: Target, module: nn.Module, inputs: Tensor, with_input: bool = False) -> Tensor:
    """The output of `module` when `target.model` runs on `inputs`, flattened to (examples, width), preceded
    column-wise by the module's (first) input when `with_input`."""
    module_input, output = _module_activations(target, module, inputs)
    return torch.cat([module_input, output], dim=1) if with_input else output


def _feature_directions(target: Target, module: nn.Module) -> Tensor | None:
    """Feature i's direction in the module's output space: how that output moves when feature i alone is on
    (the ground truth's one-hot input) against when nothing is (TMS's hidden layer: column i of W; a residual MLP
    block: what the block writes for feature i). None without ground truth."""
    if target.ground_truth is None:
        return None
    one_hot = target.one_hot_inputs()
    moved = record_activations(target, module, one_hot) - record_activations(target, module, torch.zeros_like(one_hot))
    return F.normalize(moved, dim=1)


def find_module(model: nn.Module, hook: str, model_name: str) -> nn.Module:
    """The module named `hook` in `model.named_modules()`; an error listing the hook points if there is none."""
    modules = dict(model.named_modules())
    if hook not in modules or not hook:
        names = ", ".join(name for name in modules if name)
        raise UnmergeError(f"{model_name} has no module {hook!r}; hook points: {names}")
    return modules[hook]


def target_activation_source(target: Target, hook: str, transcoder: bool = False) -> ActivationSource:
    """Activations of `target` at the module named `hook` (a transcoder's: its input and output), with true
    features where the ground truth has them."""
    module = find_module(target.model, hook, target.name)
    input_dim, dim = (
        part.shape[1]
        for part in _module_activations(target, module, target.sample_inputs(1, torch.Generator().manual_seed(0)))
    )
    return ActivationSource(
        name=f"{target.name}/{hook}" + ("/transcoder" if transcoder else ""),
        dim=input_dim if transcoder else dim,
        sample=lambda size, generator: record_activations(
            target, module, target.sample_inputs(size, generator), with_input=transcoder
        ),
        true_features=_feature_directions(target, module),
        output_dim=dim if transcoder else None,
    )
