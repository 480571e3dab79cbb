"""Parameters of SPD: rank-1 subcomponents `U V` per site, causal-importance functions, and the hard sigmoids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unmerge.errors import ConfigError
from unmerge.kernels.cpu.ci import (
    fused_hard_sigmoids,
    fused_kernel_available,
    fused_kernel_serves,
    kernel_unavailable_reason,
    scalar_mlp_ci,
    scalar_mlp_ci_reference,
)


def lower_leaky_hard_sigmoid(x: Tensor, leak: float) -> Tensor:
    """σ_lower: `leak·x` for x ≤ 0, x on [0, 1], 1 above. Feeds the masks, so negative γ still gets gradient."""
    return torch.where(x > 0, x.clamp(max=1.0), leak * x)


def upper_leaky_hard_sigmoid(x: Tensor, leak: float) -> Tensor:
    """σ_upper: 0 for x ≤ 0, x on [0, 1], `1 + leak·(x − 1)` above. Feeds the importance penalty."""
    return torch.where(x > 1, 1 + leak * (x - 1), x.clamp(min=0.0))


def leaky_hard_sigmoids(x: Tensor, leak: float, c_kernel: bool) -> tuple[Tensor, Tensor]:
    """`(σ_lower(x), σ_upper(x))`; with `c_kernel`, by one pass of the C kernel where it serves `x` (float32 on the
    CPU; same values and gradients)."""
    if c_kernel and fused_kernel_serves(x):
        return fused_hard_sigmoids(x, leak)
    return lower_leaky_hard_sigmoid(x, leak), upper_leaky_hard_sigmoid(x, leak)


def uses_c_kernel(choice: str, device: torch.device) -> bool:
    """Whether SPD computes causal importances, hard sigmoids and masks with the C kernel: `torch` never, `c`
    always (an error where it cannot run), `auto` on the CPU where a C compiler builds it."""
    if choice == "torch":
        return False
    on_cpu = torch.device(device).type == "cpu"
    if choice == "auto":
        return on_cpu and fused_kernel_available()
    if not on_cpu:
        raise ConfigError(
            f"method.ci_kernel=c runs on the CPU only, but the target is on {device}; "
            "set method.ci_kernel=auto or torch"
        )
    if not fused_kernel_available():
        raise ConfigError(
            f"method.ci_kernel=c, but the C kernel cannot be used here ({kernel_unavailable_reason()}); "
            "install a C compiler (gcc) or set method.ci_kernel=torch"
        )
    return True


class LinearComponents(nn.Module):
    """`W ≈ U V` with U: (d_out, C), V: (C, d_in); subcomponent c is the rank-1 matrix `U[:, c] V[c, :]`. Drawn
    from the (CPU) generator, so the same on every device, then placed where the weight lives."""

    def __init__(self, weight: Tensor, C: int, generator: torch.Generator) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        U = F.normalize(torch.randn(d_out, C, generator=generator), dim=0).to(weight.device)
        V = F.normalize(torch.randn(C, d_in, generator=generator), dim=1).to(weight.device)
        alignment = torch.einsum("oc,oi,ci->c", U, weight.detach().float(), V)
        self.U = nn.Parameter(U * alignment)
        self.V = nn.Parameter(V)

    def weight(self) -> Tensor:
        return self.U @ self.V


class TransposedComponents:
    """The subcomponents of a site whose weight is the transpose of another site's (tied weights)."""

    def __init__(self, source: Any) -> None:  # anything with U, V and weight(): LinearComponents, SiteTensors
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

    The functions of all sites are evaluated together by one batched call (`causal_importances`)."""

    def __init__(self, C: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(C, hidden, generator=generator) * 2**0.5)
        self.b1 = nn.Parameter(torch.zeros(C, hidden))
        self.w2 = nn.Parameter(torch.randn(C, hidden, generator=generator) * (2 / hidden) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(C))


class GlobalMLPCI(nn.Module):
    """A global CI function (later SPD work): one MLP reads the inner activations of every site, concatenated
    (ΣC), and gives every subcomponent's γ, so a subcomponent's importance may depend on what all sites see.
    GELU between layers; He-initialised weights, zero biases."""

    def __init__(self, total_C: int, hidden: list[int], generator: torch.Generator) -> None:
        super().__init__()
        widths = [total_C, *hidden, total_C]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(out, into, generator=generator) * (2 / into) ** 0.5)
            for into, out in zip(widths, widths[1:], strict=False)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(out)) for out in widths[1:])

    def forward(self, h: Tensor) -> Tensor:
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = F.linear(h, weight, bias)
            if layer < len(self.weights) - 1:
                h = F.gelu(h)
        return h


class CIWeights(Protocol):
    """A CI function's weights: a `ScalarMLPCI`, or the `SiteTensors` its site's forward returned."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor


CI_BLOCK_ELEMENTS = 2**27  # the largest (rows, ΣC, hidden) block torch's CI materialises at once: 512 MiB in fp32


def causal_importances(functions: Sequence[CIWeights], inner: list[Tensor], c_kernel: bool) -> Tensor:
    """Pre-sigmoid γ of every site's subcomponents from their inner activations `h = a Vᵀ`, concatenated along
    the last axis in the given order, in one call (the C kernel's with `c_kernel`, else torch's). γ is computed in
    fp32 from bf16 inner activations too: these are elementwise ops, where bf16 saves nothing but precision.

    Torch's path materialises (rows, ΣC, hidden) several times over (on a whole language model, 97,920
    subcomponents × 16 × 4,096 tokens is 26 GB each), so it runs over blocks of rows of at most
    `CI_BLOCK_ELEMENTS`, and with gradients each block is recomputed in backward, keeping only h: memory is
    bounded whatever the batch; every value is computed as in one call (the CI weights' gradients are summed
    block by block, so equal up to rounding)."""
    h = torch.cat(inner, dim=-1).float()
    params = [torch.cat([getattr(f, name) for f in functions]) for name in ("w1", "b1", "w2", "b2")]
    if c_kernel:
        return scalar_mlp_ci(h, *params)
    rows = h.reshape(-1, h.shape[-1])
    blocks = rows.split(max(1, CI_BLOCK_ELEMENTS // params[0].numel()))
    if torch.is_grad_enabled():
        gamma = [checkpoint(scalar_mlp_ci_reference, block, *params, use_reentrant=False) for block in blocks]
    else:
        gamma = [scalar_mlp_ci_reference(block, *params) for block in blocks]
    return (gamma[0] if len(gamma) == 1 else torch.cat(gamma)).reshape(h.shape)
