"""The decomposed model: a frozen target and, for each of its chosen weights, one record (`DecomposedSite`) holding
where the weight is, its subcomponents `U V` and its causal-importance function, all one `nn.Module` tree, so
`.to(...)`, `state_dict()` and `torch.compile` see the whole thing.

Sites are the modules `unmerge.spd.sites` finds; a site whose weight is the transpose of another site's (tied
weights) shares that site's subcomponents, transposed.

A pass over the target (clean, masked, edited) attaches hooks to each site (`Site.attach`: a forward pre-hook and
a forward hook on a site's module; hook points for a TransformerLens parameter), inside a context manager that
always removes them; the target and its modules are never changed. Given the site's input `a`, the pass computes
what it asks of the site, e.g. `((a Vᵀ) ⊙ m) Uᵀ + bias` (for an embedding `a Vᵀ` is the lookup `Vᵀ[ids]`), never
a per-example matrix, and that becomes the site's output; a module's own forward then runs on an empty batch
(`a[:0]`), so the replaced computation costs nothing. Hooks a user registered on the module still run: their
pre-hooks before the pass's, their forward hooks after it, on the output the pass gave. Two exact shortcuts make
the passes cheap: until the first masked site of a pass has run, every activation equals the clean pass's, so an
unmasked site returns its cached clean output and a masked site reuses the inner activations `a Vᵀ` already
computed for the causal importances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import SiteConfig
from unmerge.errors import SiteError
from unmerge.spd.components import (
    Components,
    GlobalMLPCI,
    LinearComponents,
    ScalarMLPCI,
    TransposedComponents,
    causal_importances,
)
from unmerge.spd.losses import faithfulness_loss
from unmerge.spd.records import (
    Behaviour,
    CleanPass,
    DecomposedSite,
    Decomposition,
    Observer,
    SiteTensors,
    site_key,
)
from unmerge.spd.sites import find_sites, find_tied_sites
from unmerge.train.devices import autocast, device_of


def _widened(output: Tensor) -> Tensor:
    """A pass's output in fp32 when the target computed it in bf16 (losses and metrics are read in fp32)."""
    return output.float() if output.dtype == torch.bfloat16 else output


class _SiteHooks:
    """What a pass does at one site. With a pass's `behaviour` set, the site's input gives the pass's output for
    it (or None: the site's own); the site's output, whichever computed it, is shown to the pass's `observer` if
    it has one. Without a pass both leave the site alone. The site attaches these (`Site.attach`)."""

    def __init__(self, record: DecomposedSite) -> None:
        self.record = record
        self.behaviour: Behaviour | None = None
        self.observer: Observer | None = None
        self.replacement: Tensor | None = None

    def on_input(self, a: Tensor) -> Tensor | None:
        self.replacement = None if self.behaviour is None else self.behaviour(self.record, a)
        return self.replacement

    def on_output(self, own_output: Callable[[], Tensor]) -> Tensor | None:
        replacement, self.replacement = self.replacement, None
        if self.observer is not None:
            self.observer(self.record, own_output() if replacement is None else replacement)
        return replacement


class ComponentModel(nn.Module):
    """A frozen target and its decomposition: one `DecomposedSite` per chosen weight (`sites`), and the global CI
    function (`global_ci`) when `global_ci_hidden` gives its hidden widths instead of one scalar MLP per
    subcomponent; with `ci_hidden` None no causal-importance function at all (APD ranks by attributions)."""

    def __init__(
        self,
        target: nn.Module,
        sites: list[SiteConfig],
        ci_hidden: int | None,
        generator: torch.Generator,
        c_kernel: bool = False,
        global_ci_hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.c_kernel = c_kernel
        found = find_sites(target, sites)
        tied = find_tied_sites({f.name: f.site.weight for f in found})
        for name, source in tied.items():
            C = {f.name: f.C for f in found}
            if C[name] != C[source]:
                raise SiteError(
                    f"sites {source!r} and {name!r} share tied weights, so they need the same C "
                    f"(got {C[source]} and {C[name]})"
                )
        # every site's U and V first, then every CI function: the order the generator has always been drawn in
        components = {f.name: LinearComponents(f.site.weight, f.C, generator) for f in found if f.name not in tied}
        per_subcomponent = ci_hidden is not None and not global_ci_hidden
        functions = {f.name: ScalarMLPCI(f.C, ci_hidden, generator) for f in found} if per_subcomponent else {}
        self.sites = Decomposition(
            {
                site_key(f.name): DecomposedSite(f, components.get(f.name), tied.get(f.name), functions.get(f.name))
                for f in found
            }
        )
        total_C = sum(f.C for f in found)
        self.global_ci = GlobalMLPCI(total_C, global_ci_hidden, generator) if global_ci_hidden else None
        self._place_on(device_of(target))  # drawn on the CPU, trained where the target is
        self._components: dict[str, Components] = {
            record.name: record.components
            if record.tied_to is None
            else TransposedComponents(self.site(record.tied_to).components)
            for record in self.sites.values()
        }
        self._hooks = [_SiteHooks(record) for record in self.sites.values()]
        self._attached = False
        self._live: dict[str, SiteTensors] | None = None

    def _place_on(self, device: torch.device) -> None:
        """Move the decomposition (not the target) to `device`."""
        self.sites.to(device)
        if self.global_ci is not None:
            self.global_ci.to(device)

    def train(self, mode: bool = True) -> ComponentModel:
        """Train or evaluate the decomposition; the target stays in evaluation mode (it is frozen)."""
        super().train(mode)
        self.target.eval()
        return self

    @property
    def site_names(self) -> list[str]:
        return [record.name for record in self.sites.values()]

    @property
    def site_C(self) -> dict[str, int]:
        return {record.name: record.C for record in self.sites.values()}

    @property
    def tied(self) -> dict[str, str]:
        """Tied site → the site whose subcomponents it shares, transposed."""
        return {record.name: record.tied_to for record in self.sites.values() if record.tied_to is not None}

    def site(self, name: str) -> DecomposedSite:
        key = site_key(name)
        if key not in self.sites:
            raise SiteError(f"no such site: {name}; the sites are {', '.join(self.site_names)}")
        return self.sites[key]

    def site_components(self, name: str) -> Components | SiteTensors | TransposedComponents:
        """The site's subcomponents (a tied site's are its source's, transposed): within `attached()` the tensors
        the sites' forwards returned for this step, else the parameters."""
        if name not in self._components:
            self.site(name)  # names the sites in its error
        if self._live is None:
            return self._components[name]
        tied_to = self.site(name).tied_to
        return self._live[name] if tied_to is None else TransposedComponents(self._live[tied_to])

    def component_parameters(self) -> list[nn.Parameter]:
        """Every site's own U and V (tied sites have none of their own)."""
        return [
            p for record in self.sites.values() if record.components is not None for p in record.components.parameters()
        ]

    def target_weight(self, name: str) -> Tensor:
        """The site's weight as `(d_out, d_in)`."""
        return self.site(name).site.weight

    def faithfulness(self) -> Tensor:
        """`(1/N) Σ_l ‖W^l − U^l V^l‖²` in fp32 even within a bf16 step: the difference is small beside W, and bf16
        would round it away (a target stored in bf16 is compared as stored)."""
        names = self.site_names
        with torch.autocast(device_of(self.target).type, enabled=False):
            return faithfulness_loss(
                [self.target_weight(n).float() for n in names], [self.site_components(n).weight() for n in names]
            )

    def weight_mean_square(self) -> float:
        """The mean square of the decomposed weights' entries: what `faithfulness` is relative to."""
        weights = [self.target_weight(name) for name in self.site_names]
        return sum(float(w.float().square().sum()) for w in weights) / sum(w.numel() for w in weights)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Keep the passes' hooks attached to the site modules while active (a method's step runs several passes;
        attaching once is cheaper), and always detach them; without it each pass attaches its own. On entry every
        site's forward runs once, and the step reads the tensors it returned (`SiteTensors`)."""
        if self._attached:
            yield
            return
        handles = []
        try:
            self._attached = True
            self._live = {record.name: record() for record in self.sites.values()}
            for hooks in self._hooks:
                handles += hooks.record.site.attach(hooks.on_input, hooks.on_output)
            yield
        finally:
            self._attached, self._live = False, None
            for handle in handles:
                handle.remove()

    def _target_precision(self) -> AbstractContextManager:
        """bf16 autocast when the target's weights are stored in bf16 (they cannot meet fp32 U and V otherwise);
        nothing for an fp32 target, so a training step's own autocast stays as it is."""
        weight = next(iter(self.target.parameters()), None)
        bf16 = weight is not None and weight.dtype == torch.bfloat16
        return autocast(device_of(self.target), "bf16") if bf16 else nullcontext()

    @contextmanager
    def _pass(self, behaviour: Behaviour, observer: Observer | None = None) -> Iterator[None]:
        """Compute every site's output by `behaviour` for one pass (module docstring), showing each to `observer`;
        a pass inside another replaces it for its own duration."""
        previous = [(hooks.behaviour, hooks.observer) for hooks in self._hooks]
        with self.attached(), self._target_precision():
            try:
                for hooks in self._hooks:
                    hooks.behaviour, hooks.observer = behaviour, observer
                yield
            finally:
                for hooks, (outer_behaviour, outer_observer) in zip(self._hooks, previous, strict=True):
                    hooks.behaviour, hooks.observer = outer_behaviour, outer_observer

    def forward(self, x: Tensor, masks: dict[str, Tensor] | None = None, observer: Observer | None = None) -> Tensor:
        """The target's output with the sites in `masks` computed from their subcomponents, each scaled per
        position by its mask `(..., C)`, and the other sites from their target weights; `observer` sees every
        site's output."""
        masks = masks or {}

        def behaviour(record: DecomposedSite, a: Tensor) -> Tensor | None:
            if record.name not in masks:
                return None
            site, components = record.site, self.site_components(record.name)
            return F.linear(site.apply(a, components.V, None) * masks[record.name], components.U, site.bias)

        with self._pass(behaviour, observer):
            return _widened(self.target(x))

    @contextmanager
    def edited_weights(self, removed: dict[str, Tensor], shift: dict[str, Tensor]) -> Iterator[None]:
        """While active, every forward of the target computes each site in `removed` with its weight minus
        `removed[name]` (d_out, d_in) and adds `shift[name]` (d_out) to that site's output: ablations and edits
        on the fly, the target's own weights untouched."""
        unknown = (removed.keys() | shift.keys()) - set(self.site_names)
        if unknown:
            raise SiteError(f"no such site: {', '.join(sorted(unknown))}; the sites are {', '.join(self.site_names)}")

        def behaviour(record: DecomposedSite, a: Tensor) -> Tensor | None:
            site, name = record.site, record.name
            if name not in removed and name not in shift:
                return None
            weight = site.weight - removed[name] if name in removed else site.weight
            output = site.apply(a, weight, site.bias)
            return output + shift[name] if name in shift else output

        with self._pass(behaviour):
            yield

    def clean_pass(self, x: Tensor, outputs: bool = True) -> CleanPass:
        """Run the target unchanged, recording every site's input and, with `outputs`, its output (what only the
        passes that mask some sites but not all reuse: each is a copy of an activation the size of the batch)."""
        inputs: dict[str, Tensor] = {}
        site_outputs: dict[str, Tensor] = {}

        def record_input(record: DecomposedSite, a: Tensor) -> None:
            if record.name in inputs:
                raise SiteError(
                    f"site {record.name!r} ran twice in one forward pass; modules reused within a forward "
                    "cannot be decomposed as one site"
                )
            inputs[record.name] = a

        def record_output(record: DecomposedSite, output: Tensor) -> None:
            site_outputs[record.name] = output

        with torch.no_grad(), self._pass(record_input, record_output if outputs else None):
            output = _widened(self.target(x))
        return CleanPass(output=output, site_inputs=inputs, site_outputs=site_outputs)

    def inner_acts(self, clean: CleanPass) -> dict[str, Tensor]:
        """`h = a Vᵀ` for every site on its clean input (gradient flows to V)."""
        with self._target_precision():
            return {
                name: self.site(name).site.apply(clean.site_inputs[name], self.site_components(name).V, None)
                for name in self.site_names
            }

    def causal_importance(self, inner: dict[str, Tensor]) -> Tensor:
        """Pre-sigmoid γ of all sites, concatenated in `site_names` order (see `split_sites`)."""
        records = list(self.sites.values())
        if self.global_ci is not None:
            return self.global_ci(torch.cat([inner[record.name] for record in records], dim=-1).float())
        functions = [record.ci if self._live is None else self._live[record.name] for record in records]
        return causal_importances(functions, [inner[record.name] for record in records], self.c_kernel)

    def split_sites(self, concatenated: Tensor) -> dict[str, Tensor]:
        """Per-site views of a (..., ΣC) tensor laid out like `causal_importance`'s output."""
        records = list(self.sites.values())
        views = concatenated.split([record.C for record in records], dim=-1)
        return {record.name: view for record, view in zip(records, views, strict=True)}

    def masked_pass(
        self,
        x: Tensor,
        masks: dict[str, Tensor],
        clean: CleanPass,
        inner: dict[str, Tensor],
        routes: dict[str, Tensor] | None = None,
        observer: Observer | None = None,
    ) -> Tensor:
        """Forward with the sites in `masks` replaced by their masked subcomponents, the rest by the target weight,
        using the clean pass's shortcuts (module docstring) where it recorded the outputs. A mask with one column
        more than the site's C also masks its delta component, the residual `W − UV` (`delta_component`). With
        `routes` (bool, one per input position and site), a site runs masked only where its route is True and
        its own weight elsewhere (`routing: subset`). `observer` sees every site's output."""
        state = {"masked_ran": False}

        def behaviour(record: DecomposedSite, a: Tensor) -> Tensor | None:
            name, site = record.name, record.site
            if name not in masks:
                return None if state["masked_ran"] else clean.site_outputs.get(name)
            components, mask = self.site_components(name), masks[name]
            h = inner[name] if not state["masked_ran"] else site.apply(a, components.V, None)
            state["masked_ran"] = True
            output = F.linear(h * mask[..., : record.C], components.U, site.bias)
            if mask.shape[-1] > record.C:
                residual = self.target_weight(name).float() - components.weight()
                output = output + mask[..., record.C :] * site.apply(a, residual, None)
            if routes is None:
                return output
            own = site.apply(a, self.target_weight(name), site.bias)
            return torch.where(routes[name].unsqueeze(-1), output, own)

        with self._pass(behaviour, observer):
            return _widened(self.target(x))
