"""Wrap a frozen target: find its sites, hold their subcomponents and CI functions, run masked forward passes.

Sites are modules chosen by fnmatch patterns over module names whose forward is a linear map of their weight
(checked on a probe input), in one of three kinds: `F.linear(x, W, b)` (`nn.Linear`, attention projections),
`x W + b` (GPT-2's `Conv1D`, TransformerLens's `Unembed`), or a row lookup `W[ids]` (`nn.Embedding`,
TransformerLens's `Embed`: a token-indexed site, the linear map of one-hot inputs). Every site's weight is held
in one orientation, `(d_out, d_in)`; an embedding's is `Wᵀ` with d_in the vocabulary. A site whose weight is the
transpose of another site's (tied weights, e.g. GPT-2's `wte` and `lm_head`) shares that site's subcomponents,
transposed. During a masked pass each site's `forward` is swapped, inside a context manager that always restores
it, for one that computes `((a Vᵀ) ⊙ m) Uᵀ + bias` (for an embedding `a Vᵀ` is the lookup `Vᵀ[ids]`), never a
per-example matrix.

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


Apply = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _linear(a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(a, weight, bias)


def _lookup(ids: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The linear map of one-hot inputs, `onehot(ids) Wᵀ`, as a row lookup of `Wᵀ`."""
    output = F.embedding(ids, weight.T)
    return output if bias is None else output + bias


@dataclass(frozen=True)
class Site:
    """A decomposable module: its weight as `(d_out, d_in)` (a view of the module's own parameter), its bias, and
    how an input meets a `(d_out, d_in)` matrix (`apply(a, W, b)`: `F.linear`, or a lookup for token ids)."""

    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    apply: Apply
    kind: str


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


def _probe_agrees(module: nn.Module, probe: Tensor, expected: Tensor) -> bool:
    with torch.no_grad():
        try:
            output = module(probe)
        except Exception:  # noqa: BLE001 - any failure means the module is not this kind of map
            return False
    return isinstance(output, Tensor) and output.shape == expected.shape and torch.allclose(output, expected,
                                                                                           atol=1e-5)


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
        probe = torch.randn(3, oriented.shape[1], generator=generator, dtype=weight.dtype)
        if _probe_agrees(module, probe, F.linear(probe, oriented, bias)):
            return Site(module, oriented, bias, _linear, kind)
    ids = torch.randint(weight.shape[0], (2, 3), generator=generator)
    if bias is None and _probe_agrees(module, ids, F.embedding(ids, weight)):
        return Site(module, weight.T, None, _lookup, "embedding")
    return None


def find_sites(target: nn.Module, sites: list[SiteConfig]) -> dict[str, tuple[Site, int]]:
    """Map each matched module name to its site and C; every pattern must match at least one decomposable
    module."""
    modules = dict(target.named_modules())
    chosen: dict[str, tuple[Site, int]] = {}
    for config in sites:
        matched = [name for name in modules if name and fnmatch.fnmatchcase(name, config.pattern)]
        if not matched:
            candidates = ", ".join(n for n, m in modules.items() if n and as_site(m) is not None) or "none"
            raise SiteError(f"site pattern {config.pattern!r} matches no module of the target; "
                            f"decomposable modules are: {candidates}")
        for name in matched:
            site = as_site(modules[name])
            if site is None:
                raise SiteError(f"module {name!r} ({type(modules[name]).__name__}, matched by {config.pattern!r}) "
                                "is not a linear map of one weight (x Wᵀ + b, x W + b, or an embedding lookup "
                                "W[ids]); choose a narrower pattern")
            chosen[name] = (site, config.C)
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
        found = find_sites(target, sites)
        self.site_names = list(found)
        self.sites = {name: site for name, (site, _) in found.items()}
        site_C = {name: C for name, (_, C) in found.items()}
        weights = {name: site.weight for name, site in self.sites.items()}
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
        """The site's weight as `(d_out, d_in)`."""
        return self.sites[name].weight

    @contextmanager
    def _swapped_forwards(self, make_forward: Callable[[str], Callable[[Tensor], Tensor]]) -> Iterator[None]:
        """Replace every site's forward for the duration of one pass; always restore it."""
        previous = {name: site.module.__dict__.get("forward") for name, site in self.sites.items()}
        try:
            for name, site in self.sites.items():
                site.module.forward = make_forward(name)
            yield
        finally:
            for name, site in self.sites.items():
                if previous[name] is None:
                    del site.module.forward
                else:
                    site.module.forward = previous[name]

    @contextmanager
    def edited_weights(self, removed: dict[str, Tensor], shift: dict[str, Tensor]) -> Iterator[None]:
        """While active, every forward of the target computes each site in `removed` with its weight minus
        `removed[name]` (d_out, d_in) and adds `shift[name]` (d_out) to that site's output: ablations and edits
        on the fly, the target's own weights untouched."""
        unknown = (removed.keys() | shift.keys()) - set(self.site_names)
        if unknown:
            raise SiteError(f"no such site: {', '.join(sorted(unknown))}; the sites are {', '.join(self.site_names)}")

        def make_forward(name: str) -> Callable[[Tensor], Tensor]:
            site = self.sites[name]
            weight = site.weight - removed[name] if name in removed else site.weight

            def forward(a: Tensor) -> Tensor:
                output = site.apply(a, weight, site.bias)
                return output + shift[name] if name in shift else output

            return forward

        with self._swapped_forwards(make_forward):
            yield

    def clean_pass(self, x: Tensor) -> CleanPass:
        """Run the target unchanged, recording every site's input and output."""
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}

        def make_forward(name: str) -> Callable[[Tensor], Tensor]:
            site = self.sites[name]

            def forward(a: Tensor) -> Tensor:
                if name in inputs:
                    raise SiteError(f"site {name!r} ran twice in one forward pass; modules reused within a forward "
                                    "cannot be decomposed as one site")
                inputs[name] = a
                outputs[name] = site.apply(a, site.weight, site.bias)
                return outputs[name]

            return forward

        with torch.no_grad(), self._swapped_forwards(make_forward):
            output = self.target(x)
        return CleanPass(output=output, site_inputs=inputs, site_outputs=outputs)

    def inner_acts(self, clean: CleanPass) -> dict[str, Tensor]:
        """`h = a Vᵀ` for every site on its clean input (gradient flows to V)."""
        return {name: self.sites[name].apply(clean.site_inputs[name], self.site_components(name).V, None)
                for name in self.site_names}

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
            site = self.sites[name]

            def forward(a: Tensor) -> Tensor:
                if name not in masks:
                    if not state["masked_ran"]:
                        return clean.site_outputs[name]
                    return site.apply(a, site.weight, site.bias)
                components = self.site_components(name)
                h = inner[name] if not state["masked_ran"] else site.apply(a, components.V, None)
                state["masked_ran"] = True
                return F.linear(h * masks[name], components.U, site.bias)

            return forward

        with self._swapped_forwards(make_forward):
            return self.target(x)
