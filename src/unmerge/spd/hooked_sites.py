"""Sites inside TransformerLens blocks: weights stored as parameters with heads as a tensor dimension and used
through einsum (`W_Q`, `W_K`, `W_V`: (heads, d_model, d_head); `W_O`: (heads, d_head, d_model); `W_in`,
`W_gate`: (d_model, d_mlp); `W_out`: (d_mlp, d_model)), so no module computes them alone.

Such a site is named after its parameter, per matrix (`blocks.0.attn.W_Q`, all heads as one `(heads·d_head,
d_model)` map) or per head (`blocks.0.attn.W_Q.3`, one `(d_head, d_model)` map). It is reached through the block's
hook points: its input is taken where the block has it (the attention's query/key/value inputs, `hook_z`, the
MLP's input, `hook_post`) and its output is replaced where the block has it (`hook_q`, `hook_k`, `hook_v`,
`hook_pre`, `hook_pre_linear`, or the attention's / MLP's own output). A head's query, key or value replaces its
slot of the heads axis; a head's output projection replaces its term of the sum over heads. The block's own
einsum still runs (its result is discarded where replaced), so these sites cost one extra matmul each.

Recognised by duck typing (an attention module with `W_Q` and `hook_q`, an MLP with `W_in` and `hook_pre`);
transformer_lens itself is never imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unmerge.errors import SiteError

OnInput = Callable[[Tensor], Tensor | None]  # the site's input → the pass's output for it (None: its own)
OnOutput = Callable[[Callable[[], Tensor]], Tensor | None]  # the site's own output (lazily) → the pass's


@dataclass(frozen=True)
class _Slot:
    """Where a parameter's input comes from and where its output goes, inside its block."""

    input_point: str  # "attn:<i>" (the attention's i-th input), "mlp" (the MLP's input) or a hook point's name
    output_point: str  # a hook point's name, or "" for the block module's own output
    bias: str | None  # the bias added in the same place, if any
    heads: bool  # the parameter has a leading heads axis


ATTENTION_SLOTS = {
    "W_Q": _Slot("attn:0", "hook_q", "b_Q", True),
    "W_K": _Slot("attn:1", "hook_k", "b_K", True),
    "W_V": _Slot("attn:2", "hook_v", "b_V", True),
    "W_O": _Slot("hook_z", "", "b_O", True),
}
MLP_SLOTS = {"W_in": _Slot("mlp", "hook_pre", "b_in", False), "W_out": _Slot("hook_post", "", "b_out", False)}
GATED_MLP_SLOTS = {
    "W_gate": _Slot("mlp", "hook_pre", None, False),
    "W_in": _Slot("mlp", "hook_pre_linear", None, False),
    "W_out": _Slot("hook_post", "", "b_out", False),
}
ATTENTION_INPUTS = ("query_input", "key_input", "value_input")


def block_slots(module: nn.Module) -> dict[str, _Slot]:
    """The einsum-used parameters of a TransformerLens attention or MLP module (empty for any other module)."""
    own = dict(module.named_parameters(recurse=False))
    if "W_Q" in own and hasattr(module, "hook_q") and hasattr(module, "hook_z"):
        return {name: slot for name, slot in ATTENTION_SLOTS.items() if name in own}
    if "W_in" in own and "W_out" in own and hasattr(module, "hook_pre") and hasattr(module, "hook_post"):
        return GATED_MLP_SLOTS if "W_gate" in own else MLP_SLOTS
    return {}


@dataclass(frozen=True)
class HookedSite:
    """One einsum-used parameter of a TransformerLens block as a `(d_out, d_in)` site, per matrix (`head` None)
    or for one head."""

    module: nn.Module
    parameter: str
    head: int | None
    slot: _Slot
    kind: str = "hooked"

    @property
    def weight(self) -> Tensor:
        raw = getattr(self.module, self.parameter)
        if self.head is not None:
            return raw[self.head].T
        if not self.slot.heads:
            return raw.T
        heads, first, second = raw.shape
        if self.parameter == "W_O":  # (heads, d_head, d_model): input is z with heads and d_head flattened
            return raw.reshape(heads * first, second).T
        return raw.transpose(1, 2).reshape(heads * second, first)

    @property
    def bias(self) -> Tensor | None:
        slot = self.slot
        bias = getattr(self.module, slot.bias) if slot.bias else None
        if bias is None or (self.parameter == "W_O" and self.head is not None):
            return None  # a head's output projection is one term of a sum that adds b_O once
        return bias[self.head] if self.head is not None else bias.reshape(-1)

    def apply(self, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(a, weight, bias)

    def subtract_(self, delta: Tensor) -> None:
        """Remove `delta` (d_out, d_in) from the parameter in place (unlearning)."""
        raw = getattr(self.module, self.parameter).data
        if self.head is not None:
            raw[self.head] -= delta.T
        elif not self.slot.heads:
            raw -= delta.T
        elif self.parameter == "W_O":
            raw -= delta.T.reshape(raw.shape)
        else:
            raw -= delta.reshape(raw.shape[0], raw.shape[2], raw.shape[1]).transpose(1, 2)

    def _own_input(self, full: Tensor) -> Tensor:
        """The site's input `(..., d_in)` from what its input point holds."""
        if self.parameter == "W_O":
            return full[..., self.head, :] if self.head is not None else full.flatten(-2)
        return full

    def _own_output(self, output: Tensor, a: Tensor) -> Tensor:
        """The site's own output `(..., d_out)` from what its output point computed."""
        if self.head is None:
            return output.flatten(-2) if self.slot.heads and self.parameter != "W_O" else output
        if self.parameter == "W_O":
            return F.linear(a, self.weight)
        return output[..., self.head, :]

    def _combined(self, output: Tensor, replacement: Tensor, a: Tensor) -> Tensor:
        """The output point's value with the site's part replaced."""
        if self.head is None:
            return replacement.reshape(output.shape)
        if self.parameter == "W_O":
            return output - F.linear(a, self.weight) + replacement
        h = self.head  # out of place, so autograd sees it
        return torch.cat([output[..., :h, :], replacement.unsqueeze(-2), output[..., h + 1 :, :]], dim=-2)

    def attach(self, on_input: OnInput, on_output: OnOutput) -> list[RemovableHandle]:
        """Take the site's input at its input point and replace its part of the output point."""
        slot, module = self.slot, self.module
        held: dict[str, Tensor] = {}

        def take(full: Tensor) -> None:
            held["a"] = self._own_input(full)
            on_input(held["a"])

        def give(_: nn.Module, __: tuple, output: Tensor) -> Tensor | None:
            a = held.pop("a")
            replacement = on_output(lambda: self._own_output(output, a))
            return None if replacement is None else self._combined(output, replacement, a)

        if slot.input_point.startswith("attn:"):
            index = int(slot.input_point.split(":")[1])

            def before(_: nn.Module, args: tuple, kwargs: dict) -> None:
                take(args[index] if len(args) > index else kwargs[ATTENTION_INPUTS[index]])

            taking = module.register_forward_pre_hook(before, with_kwargs=True)
        elif slot.input_point == "mlp":
            taking = module.register_forward_pre_hook(
                lambda _, args, kwargs: take(args[0] if args else kwargs["x"]), with_kwargs=True
            )
        else:
            taking = getattr(module, slot.input_point).register_forward_hook(lambda _, __, output: take(output))
        target = getattr(module, slot.output_point) if slot.output_point else module
        return [taking, target.register_forward_hook(give, prepend=True)]


def hooked_site_names(modules: dict[str, nn.Module]) -> dict[str, tuple[str, str, int | None]]:
    """Every einsum-used parameter of every TransformerLens block, per matrix and per head: name → (block's
    module name, parameter, head)."""
    names: dict[str, tuple[str, str, int | None]] = {}
    for module_name, module in modules.items():
        for parameter, slot in block_slots(module).items():
            names[f"{module_name}.{parameter}"] = (module_name, parameter, None)
            if slot.heads:
                heads = getattr(module, parameter).shape[0]
                names |= {f"{module_name}.{parameter}.{h}": (module_name, parameter, h) for h in range(heads)}
    return names


def hooked_site(modules: dict[str, nn.Module], module_name: str, parameter: str, head: int | None) -> HookedSite:
    """The site, checked against the block's configuration."""
    module = modules[module_name]
    config = getattr(module, "cfg", None)
    if parameter in ("W_Q", "W_K", "W_V") and (
        getattr(config, "use_split_qkv_input", False) or getattr(config, "use_attn_in", False)
    ):
        raise SiteError(
            f"{module_name}.{parameter}: the block reads a separate input per head (use_split_qkv_input or "
            "use_attn_in), which these sites do not follow; turn those options off to decompose it"
        )
    return HookedSite(module, parameter, head, block_slots(module)[parameter])
