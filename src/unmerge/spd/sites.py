"""Sites: the weights SPD can decompose, found by fnmatch patterns over module names.

A site is a module whose forward is a linear map of one weight (checked on a probe input), in one of three kinds:
`F.linear(x, W, b)` (`nn.Linear`, attention projections), `x W + b` (GPT-2's `Conv1D`, TransformerLens's
`Unembed`), or a row lookup `W[ids]` (`nn.Embedding`, TransformerLens's `Embed`: a token-indexed site, the linear
map of one-hot inputs). Every site's weight is read in one orientation, `(d_out, d_in)`; an embedding's is `Wᵀ`
with d_in the vocabulary. A site whose weight is the transpose of another site's (tied weights, e.g. GPT-2's `wte`
and `lm_head`) is found too, to share that site's subcomponents. TransformerLens blocks' einsum-used parameters
(`blocks.0.attn.W_Q`, per head `blocks.0.attn.W_Q.3`) are sites too (`unmerge.spd.hooked_sites`).

Every site meets a pass the same way, through `attach(on_input, on_output)`: it shows the pass its input and lets
the pass replace its output.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unmerge.config import SiteConfig
from unmerge.errors import SiteError
from unmerge.spd.hooked_sites import HookedSite, OnInput, OnOutput, hooked_site, hooked_site_names


def _linear(a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(a, weight, bias)


def _lookup(ids: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The linear map of one-hot inputs, `onehot(ids) Wᵀ`, as a row lookup of `Wᵀ`."""
    output = F.embedding(ids, weight.T)
    return output if bias is None else output + bias


def _site_parameters(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The module's weight and bias: `weight`/`bias` attributes, else its only matrix and vector parameters."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        bias = getattr(module, "bias", None)
        return weight, bias if isinstance(bias, Tensor) else None
    own = list(module.parameters(recurse=False))
    matrices = [p for p in own if p.dim() == 2]
    vectors = [p for p in own if p.dim() == 1]
    if len(matrices) != 1 or len(vectors) > 1 or len(own) != len(matrices) + len(vectors):
        return None
    return matrices[0], vectors[0] if vectors else None


@dataclass(frozen=True)
class Site:
    """A decomposable module and how its forward meets a `(d_out, d_in)` matrix: `kind` is "linear" (`F.linear`),
    "transposed linear" (`x W + b`) or "embedding" (a lookup of token ids). Weight and bias are read from the
    module whenever asked, so they follow it across devices and dtypes."""

    module: nn.Module
    kind: str

    @property
    def weight(self) -> Tensor:
        """The site's weight as `(d_out, d_in)`."""
        weight = _site_parameters(self.module)[0]
        return weight if self.kind == "linear" else weight.T

    @property
    def bias(self) -> Tensor | None:
        return _site_parameters(self.module)[1]

    def apply(self, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The site's input `a` through a `(d_out, d_in)` matrix and a bias, as the module's own forward would."""
        return _lookup(a, weight, bias) if self.kind == "embedding" else _linear(a, weight, bias)

    def subtract_(self, delta: Tensor) -> None:
        """Remove `delta` (d_out, d_in) from the module's weight in place (unlearning)."""
        self.weight.sub_(delta)  # `weight` is the parameter or its transposed view

    def attach(self, on_input: OnInput, on_output: OnOutput) -> list[RemovableHandle]:
        """A pre-hook shows the pass the module's input; when the pass replaces the output, the module's own
        forward runs on an empty batch (costing nothing) and the forward hook returns the replacement."""

        def before(_: nn.Module, args: tuple) -> tuple | None:
            return None if on_input(args[0]) is None else (args[0][:0], *args[1:])

        def after(_: nn.Module, __: tuple, output: Tensor) -> Tensor | None:
            return on_output(lambda: output)

        return [
            self.module.register_forward_pre_hook(before),
            self.module.register_forward_hook(after, prepend=True),
        ]


def _probe_agrees(module: nn.Module, probe: Tensor, expected: Tensor) -> bool:
    with torch.no_grad():
        try:
            output = module(probe)
        except Exception:
            return False
    return isinstance(output, Tensor) and output.shape == expected.shape and torch.allclose(output, expected, atol=1e-5)


def as_site(module: nn.Module) -> Site | None:
    """The module as a site, if its forward is one of the three linear kinds on a probe input; else None."""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return None  # its forward renormalises the weight in place
    parameters = _site_parameters(module)
    if parameters is None or parameters[0].dim() != 2:
        return None
    weight, bias = parameters
    generator = torch.Generator().manual_seed(0)
    for oriented, kind in ((weight, "linear"), (weight.T, "transposed linear")):
        if bias is not None and bias.shape[0] != oriented.shape[0]:
            continue
        probe = torch.randn(3, oriented.shape[1], generator=generator, dtype=weight.dtype).to(weight.device)
        if _probe_agrees(module, probe, F.linear(probe, oriented, bias)):
            return Site(module, kind)
    ids = torch.randint(weight.shape[0], (2, 3), generator=generator).to(weight.device)
    if bias is None and _probe_agrees(module, ids, F.embedding(ids, weight)):
        return Site(module, "embedding")
    return None


@dataclass(frozen=True)
class FoundSite:
    """A module matched by a site pattern: its name, the pattern, the site and its number of subcomponents."""

    name: str
    pattern: str
    site: Site | HookedSite
    C: int


def _site_named(
    modules: dict[str, nn.Module], hooked: dict[str, tuple[str, str, int | None]], name: str, pattern: str
) -> Site | HookedSite:
    if name in hooked:
        return hooked_site(modules, *hooked[name])
    site = as_site(modules[name])
    if site is None:
        raise SiteError(
            f"module {name!r} ({type(modules[name]).__name__}, matched by {pattern!r}) "
            "is not a linear map of one weight (x Wᵀ + b, x W + b, or an embedding lookup "
            "W[ids]); choose a narrower pattern"
        )
    return site


def find_site(target: nn.Module, name: str) -> Site | HookedSite:
    """The site of that name in `target` (a module, or a TransformerLens block's parameter)."""
    modules = dict(target.named_modules())
    return _site_named(modules, hooked_site_names(modules), name, name)


def _no_weight_twice(found: list[FoundSite]) -> None:
    """A TransformerLens parameter is one site per matrix or one per head, not both."""
    whole = {f.name for f in found if isinstance(f.site, HookedSite) and f.site.head is None}
    for f in found:
        if isinstance(f.site, HookedSite) and f.site.head is not None and f.name.rsplit(".", 1)[0] in whole:
            raise SiteError(
                f"site {f.name!r} (one head) and {f.name.rsplit('.', 1)[0]!r} (the whole matrix) are both chosen; "
                "decompose the weight per matrix or per head, not both"
            )


def find_sites(target: nn.Module, sites: list[SiteConfig]) -> list[FoundSite]:
    """Every module (or TransformerLens parameter) matched by the site patterns, in pattern order; every pattern
    must match at least one decomposable module."""
    modules = dict(target.named_modules())
    hooked = hooked_site_names(modules)
    names = [name for name in modules if name] + list(hooked)
    chosen: dict[str, FoundSite] = {}
    for config in sites:
        matched = [name for name in names if fnmatch.fnmatchcase(name, config.pattern)]
        if not matched:
            candidates = [n for n, m in modules.items() if n and as_site(m) is not None]
            candidates += [n for n, (_, _, head) in hooked.items() if head is None]
            raise SiteError(
                f"site pattern {config.pattern!r} matches no module of the target; decomposable modules are: "
                f"{', '.join(candidates) or 'none'}" + (" (and each head as NAME.HEAD)" if hooked else "")
            )
        for name in matched:
            chosen[name] = FoundSite(name, config.pattern, _site_named(modules, hooked, name, config.pattern), config.C)
    _no_weight_twice(list(chosen.values()))
    return list(chosen.values())


def find_tied_sites(weights: dict[str, Tensor]) -> dict[str, str]:
    """Sites whose weight is exactly the transpose of an earlier site's weight (same storage): tied → source."""
    tied: dict[str, str] = {}
    names = list(weights)
    for i, name in enumerate(names):
        for source in names[:i]:
            w, s = weights[name], weights[source]
            if source not in tied and w.shape == s.shape[::-1] and w.data_ptr() == s.data_ptr():
                tied[name] = source
                break
    return tied
