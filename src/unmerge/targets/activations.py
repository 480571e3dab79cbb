"""Activations recorded at a module of a trained target, with the target's own input distribution.

Where the target has ground truth, feature i's true direction at the module is how the module's output moves when
feature i alone is on (TMS: column i of W, so a dictionary on the hidden activations is scored by the same MMCS as
SPD on the weights). A transcoder source records the module's input beside its output (a residual MLP's block: the
residual stream in, what the MLP writes out).

A batch is counted in activation rows: where one input gives several rows (a sequence model: one per position),
just enough inputs are run and the rows cut to the batch size. A target whose inputs are a stream (a
`PartSampler`: an iterable of batches a user passed, read in order) gives a source whose training batches are
recorded from the stream's own batches in order, and whose plain draws come from its pool.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.data.source import ActivationSource
from unmerge.errors import UnmergeError
from unmerge.targets.base import Target
from unmerge.train.devices import device_of
from unmerge.train.loop import PartSampler


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
    """(first input, output) of `module` when `target.model` runs on `inputs` (moved to the model's device), each
    flattened to (examples, width) on the inputs' device."""
    module_input, output = capture_module(target.model, module, inputs.to(device_of(target.model)), target.name)
    module_input, output = module_input.to(inputs.device), output.to(inputs.device)
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


class _Recorder:
    """`size` rows of activations of `module`, recorded on the fewest inputs of `target` that give them (each
    input gives `rows_per_input` rows)."""

    def __init__(self, target: Target, module: nn.Module, with_input: bool, rows_per_input: int) -> None:
        self.target, self.module, self.with_input, self.rows_per_input = target, module, with_input, rows_per_input

    def inputs_for(self, size: int) -> int:
        return math.ceil(size / self.rows_per_input)

    def record(self, inputs: Tensor, size: int) -> Tensor:
        rows = record_activations(self.target, self.module, inputs, self.with_input).float()  # bf16 models: fp32
        return rows if len(rows) == size else rows[:size]

    def __call__(self, size: int, generator: torch.Generator) -> Tensor:
        return self.record(self.target.sample_inputs(self.inputs_for(size), generator), size)


class _StreamRecorder(_Recorder):
    """A `_Recorder` over a stream of inputs (a `PartSampler`): `part` records this rank's slice of step `step`'s
    inputs, read in order from the stream, so the training loop sees the stream's batches and not only its pool."""

    def part(self, step: int, global_size: int, rank: int, world: int) -> Tensor:
        size = global_size // world
        sample_inputs = self.target.sample_inputs
        assert isinstance(sample_inputs, PartSampler)
        return self.record(sample_inputs.part(step, self.inputs_for(size) * world, rank, world), size)


def target_activation_source(target: Target, hook: str, transcoder: bool = False) -> ActivationSource:
    """Activations of `target` at the module named `hook` (a transcoder's: its input and output), with true
    features where the ground truth has them; batches are counted in rows (module docstring)."""
    module = find_module(target.model, hook, target.name)
    module_input, output = _module_activations(
        target, module, target.sample_inputs(1, torch.Generator().manual_seed(0))
    )
    recorder = _StreamRecorder if isinstance(target.sample_inputs, PartSampler) else _Recorder
    return ActivationSource(
        name=f"{target.name}/{hook}" + ("/transcoder" if transcoder else ""),
        dim=module_input.shape[1] if transcoder else output.shape[1],
        sample=recorder(target, module, transcoder, len(output)),
        true_features=_feature_directions(target, module),
        output_dim=output.shape[1] if transcoder else None,
    )
