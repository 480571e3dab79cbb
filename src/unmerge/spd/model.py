"""Wrap a frozen target: find its sites, hold their subcomponents and CI functions, run masked forward passes.

Sites are modules chosen by fnmatch patterns over module names whose forward is `F.linear(x, weight, bias)`
(checked on a probe input). A site whose weight is the transpose of another site's (tied weights) shares that
site's subcomponents, transposed. During a masked pass each site's `forward` is swapped, inside a context
manager that always restores it, for one that computes `((a Vᵀ) ⊙ m) Uᵀ + bias`, never a per-example matrix.

Two exact shortcuts make the passes cheap: until the first masked site of a pass has run, every activation equals
the clean pass's, so an unmasked site returns its cached clean output and a masked site reuses the inner
activations `a Vᵀ` already computed for the causal importances.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import SiteConfig
from unmerge.errors import SiteError
from unmerge.spd.components import Components, LinearComponents, SiteCIFunctions, TransposedComponents


def site_key(name: str) -> str:
    """Module names contain dots, which `nn.ModuleDict` keys may not."""
    return name.replace(".", "--")


@dataclass
class CleanPass:
    """The target's own forward: its output and each site's input and output (no gradients)."""

    output: Tensor
    site_inputs: dict[str, Tensor]
    site_outputs: dict[str, Tensor]


def _is_linear_site(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return False
    bias = getattr(module, "bias", None)
    probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    with torch.no_grad():
        try:
            output = module(probe)
        except Exception:  # noqa: BLE001 - any failure means the module is not a plain linear map
            return False
        return isinstance(output, Tensor) and torch.allclose(output, F.linear(probe, weight, bias), atol=1e-5)


def find_sites(target: nn.Module, sites: list[SiteConfig]) -> dict[str, int]:
    """Map each matched module name to its C; every pattern must match at least one linear module."""
    modules = dict(target.named_modules())
    chosen: dict[str, int] = {}
    for site in sites:
        matched = [name for name in modules if name and fnmatch.fnmatchcase(name, site.pattern)]
        if not matched:
            candidates = ", ".join(n for n, m in modules.items() if n and _is_linear_site(m)) or "none"
            raise SiteError(f"site pattern {site.pattern!r} matches no module of the target; "
                            f"decomposable modules are: {candidates}")
        for name in matched:
            if not _is_linear_site(modules[name]):
                raise SiteError(f"module {name!r} (matched by {site.pattern!r}) is a {type(modules[name]).__name__}, "
                                "not a linear map F.linear(x, weight, bias); choose a narrower pattern")
            chosen[name] = site.C
    return chosen


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


class ComponentModel(nn.Module):
    """Subcomponents and CI functions for the chosen sites of a frozen target (the target is not a submodule)."""

    def __init__(self, target: nn.Module, sites: list[SiteConfig], ci_hidden: int, generator: torch.Generator):
        super().__init__()
        self._target = (target,)  # a tuple keeps the frozen target out of state_dict and parameters()
        site_C = find_sites(target, sites)
        self.site_names = list(site_C)
        modules = dict(target.named_modules())
        self.site_modules = {name: modules[name] for name in self.site_names}
        weights = {name: module.weight for name, module in self.site_modules.items()}
        self.tied = find_tied_sites(weights)
        for name, source in self.tied.items():
            if site_C[name] != site_C[source]:
                raise SiteError(f"sites {source!r} and {name!r} share tied weights, so they need the same C "
                                f"(got {site_C[source]} and {site_C[name]})")
        self.components = nn.ModuleDict({
            site_key(name): LinearComponents(weights[name], site_C[name], generator)
            for name in self.site_names if name not in self.tied
        })
        self.ci = SiteCIFunctions({site_key(n): site_C[n] for n in self.site_names}, ci_hidden, generator)
        self.site_C = site_C

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def site_components(self, name: str) -> Components:
        if name in self.tied:
            return TransposedComponents(self.components[site_key(self.tied[name])])
        return self.components[site_key(name)]

    def target_weight(self, name: str) -> Tensor:
        return self.site_modules[name].weight

    @contextmanager
    def _swapped_forwards(self, make_forward: Callable[[str], Callable[[Tensor], Tensor]]) -> Iterator[None]:
        """Replace every site's forward for the duration of one pass; always restore it."""
        previous = {name: module.__dict__.get("forward") for name, module in self.site_modules.items()}
        try:
            for name, module in self.site_modules.items():
                module.forward = make_forward(name)
            yield
        finally:
            for name, module in self.site_modules.items():
                if previous[name] is None:
                    del module.forward
                else:
                    module.forward = previous[name]

    def clean_pass(self, x: Tensor) -> CleanPass:
        """Run the target unchanged, recording every site's input and output."""
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}

        def make_forward(name: str) -> Callable[[Tensor], Tensor]:
            module = self.site_modules[name]

            def forward(a: Tensor) -> Tensor:
                if name in inputs:
                    raise SiteError(f"site {name!r} ran twice in one forward pass; modules reused within a forward "
                                    "cannot be decomposed as one site")
                inputs[name] = a
                outputs[name] = F.linear(a, module.weight, getattr(module, "bias", None))
                return outputs[name]

            return forward

        with torch.no_grad(), self._swapped_forwards(make_forward):
            output = self.target(x)
        return CleanPass(output=output, site_inputs=inputs, site_outputs=outputs)

    def inner_acts(self, clean: CleanPass) -> dict[str, Tensor]:
        """`h = a Vᵀ` for every site on its clean input (gradient flows to V)."""
        return {name: F.linear(clean.site_inputs[name], self.site_components(name).V) for name in self.site_names}

    def causal_importance(self, inner: dict[str, Tensor]) -> Tensor:
        """Pre-sigmoid γ of all sites, concatenated in `site_names` order (see `split_sites`)."""
        return self.ci({site_key(n): inner[n] for n in self.site_names})

    def split_sites(self, concatenated: Tensor) -> dict[str, Tensor]:
        """Per-site views of a (..., ΣC) tensor laid out like `causal_importance`'s output."""
        views = self.ci.split(concatenated)
        return {name: views[site_key(name)] for name in self.site_names}

    def masked_pass(self, x: Tensor, masks: dict[str, Tensor], clean: CleanPass, inner: dict[str, Tensor]) -> Tensor:
        """Forward with the sites in `masks` replaced by their masked subcomponents, the rest by the target weight."""
        state = {"masked_ran": False}

        def make_forward(name: str) -> Callable[[Tensor], Tensor]:
            module = self.site_modules[name]
            bias = getattr(module, "bias", None)

            def forward(a: Tensor) -> Tensor:
                if name not in masks:
                    if not state["masked_ran"]:
                        return clean.site_outputs[name]
                    return F.linear(a, module.weight, bias)
                components = self.site_components(name)
                h = inner[name] if not state["masked_ran"] else F.linear(a, components.V)
                state["masked_ran"] = True
                return F.linear(h * masks[name], components.U, bias)

            return forward

        with self._swapped_forwards(make_forward):
            return self.target(x)
