"""The records of a decomposition: one `DecomposedSite` per decomposed weight (its module, C, subcomponents and
causal-importance function), the `Decomposition` holding them, the tensors a site's forward hands a step
(`SiteTensors`), and what a clean pass records (`CleanPass`). `unmerge.spd.model` builds and runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from unmerge.spd.components import LinearComponents, ScalarMLPCI
from unmerge.spd.sites import FoundSite


def site_key(name: str) -> str:
    """Module names contain dots, which `nn.ModuleDict` keys may not."""
    return name.replace(".", "--")


@dataclass
class CleanPass:
    """The target's own forward: its output, each site's input and, where asked for, its output (no gradients)."""

    output: Tensor
    site_inputs: dict[str, Tensor]
    site_outputs: dict[str, Tensor]


Behaviour = Callable[["DecomposedSite", Tensor], Tensor | None]  # the site's output for input a (None: its own)
Observer = Callable[["DecomposedSite", Tensor], None]  # sees the site's output, whichever computed it


@dataclass(frozen=True)
class SiteTensors:
    """A site's learned tensors as its module's forward returns them for one step: its own `U`, `V` (None when
    tied) and its CI function's `w1, b1, w2, b2` (None under a global CI function). Reading them through a forward
    is what lets FSDP2 gather a sharded site for the step and reduce-scatter its gradients after it; unsharded,
    they are the parameters themselves."""

    U: Tensor | None
    V: Tensor | None
    w1: Tensor | None
    b1: Tensor | None
    w2: Tensor | None
    b2: Tensor | None

    def weight(self) -> Tensor:
        assert self.U is not None and self.V is not None
        return self.U @ self.V


class DecomposedSite(nn.Module):
    """One decomposed weight: its module name, the pattern that chose it, its C subcomponents (`components`, or
    none of its own when its weight is tied to the site named `tied_to`) and its causal-importance function `ci`
    (None when one global function serves every site)."""

    def __init__(
        self, found: FoundSite, components: LinearComponents | None, tied_to: str | None, ci: ScalarMLPCI | None
    ) -> None:
        super().__init__()
        self.name, self.pattern, self.C, self.site = found.name, found.pattern, found.C, found.site
        self.components = components
        self.tied_to = tied_to
        self.ci = ci

    def forward(self) -> SiteTensors:
        own, ci = self.components, self.ci
        return SiteTensors(own and own.U, own and own.V, *((ci.w1, ci.b1, ci.w2, ci.b2) if ci else (None,) * 4))


class Decomposition(nn.ModuleDict):
    """What SPD learns: one `DecomposedSite` per site, keyed by `site_key` (the target is not in it)."""

    def legacy_names(self) -> list[tuple[str, str]]:
        """(name before the site records, name now) of every parameter, in the order the optimiser held them
        before (every site's U and V, then every CI function's w1, b1, w2, b2): checkpoints of that layout resume
        through it (`unmerge.train.checkpoint.restore`)."""
        pairs = []
        for key, record in self.items():
            if record.tied_to is None:
                pairs += [(f"components.{key}.{p}", f"{key}.components.{p}") for p in ("U", "V")]
        for key in self:
            pairs += [(f"ci.functions.{key}.{p}", f"{key}.ci.{p}") for p in ("w1", "b1", "w2", "b2")]
        return pairs
