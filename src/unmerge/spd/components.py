"""Parameters of SPD: rank-1 subcomponents `U V` per site, causal-importance functions, and the hard sigmoids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.spd.ci_kernel import fused_hard_sigmoids, fused_kernel_serves, scalar_mlp_ci


def lower_leaky_hard_sigmoid(x: Tensor, leak: float) -> Tensor:
    """σ_lower: `leak·x` for x ≤ 0, x on [0, 1], 1 above. Feeds the masks, so negative γ still gets gradient."""
    return torch.where(x > 0, x.clamp(max=1.0), leak * x)


def upper_leaky_hard_sigmoid(x: Tensor, leak: float) -> Tensor:
    """σ_upper: 0 for x ≤ 0, x on [0, 1], `1 + leak·(x − 1)` above. Feeds the importance penalty."""
    return torch.where(x > 1, 1 + leak * (x - 1), x.clamp(min=0.0))


def leaky_hard_sigmoids(x: Tensor, leak: float) -> tuple[Tensor, Tensor]:
    """`(σ_lower(x), σ_upper(x))`, by one fused kernel pass where it can run (same values and gradients)."""
    if fused_kernel_serves(x):
        return fused_hard_sigmoids(x, leak)
    return lower_leaky_hard_sigmoid(x, leak), upper_leaky_hard_sigmoid(x, leak)


class LinearComponents(nn.Module):
    """`W ≈ U V` with U: (d_out, C), V: (C, d_in); subcomponent c is the rank-1 matrix `U[:, c] V[c, :]`."""

    def __init__(self, weight: Tensor, C: int, generator: torch.Generator) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        U = F.normalize(torch.randn(d_out, C, generator=generator), dim=0)
        V = F.normalize(torch.randn(C, d_in, generator=generator), dim=1)
        alignment = torch.einsum("oc,oi,ci->c", U, weight.detach().float(), V)
        self.U = nn.Parameter(U * alignment)
        self.V = nn.Parameter(V)

    def weight(self) -> Tensor:
        return self.U @ self.V


class TransposedComponents:
    """The subcomponents of a site whose weight is the transpose of another site's (tied weights)."""

    def __init__(self, source: LinearComponents) -> None:
        self.source = source

    @property
    def U(self) -> Tensor:
        return self.source.V.T

    @property
    def V(self) -> Tensor:
        return self.source.U.T

    def weight(self) -> Tensor:
        return self.source.weight().T


Components = LinearComponents | TransposedComponents


class ScalarMLPCI(nn.Module):
    """The paper's CI function: one MLP `w2·GELU(w1 h + b1) + b2` per subcomponent on its scalar inner activation.

    All subcomponents (of all sites, see `SiteCIFunctions`) are evaluated by one fused batched kernel.
    """

    def __init__(self, C: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(C, hidden, generator=generator) * 2**0.5)
        self.b1 = nn.Parameter(torch.zeros(C, hidden))
        self.w2 = nn.Parameter(torch.randn(C, hidden, generator=generator) * (2 / hidden) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(C))


class SiteCIFunctions(nn.Module):
    """Pre-sigmoid causal importances γ for every site from its inner activations `h = a Vᵀ`."""

    def __init__(self, site_C: dict[str, int], hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.keys = list(site_C)
        self.functions = nn.ModuleDict({key: ScalarMLPCI(C, hidden, generator) for key, C in site_C.items()})

    def forward(self, inner: dict[str, Tensor]) -> Tensor:
        """γ of all sites concatenated along the last axis, in `self.keys` order (one kernel call)."""
        functions = [self.functions[key] for key in self.keys]
        h = torch.cat([inner[key] for key in self.keys], dim=-1)
        params = [torch.cat([getattr(f, name) for f in functions]) for name in ("w1", "b1", "w2", "b2")]
        return scalar_mlp_ci(h, *params)

    def split(self, concatenated: Tensor) -> dict[str, Tensor]:
        """Per-site views of a tensor laid out like `forward`'s output."""
        sizes = [self.functions[key].b2.shape[0] for key in self.keys]
        return dict(zip(self.keys, concatenated.split(sizes, dim=-1), strict=True))
