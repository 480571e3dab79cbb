"""Latent activation functions of a dictionary, from pre-activations z (batch × width) to latents f ≥ 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from unmerge.train import distributed


def topk(z: Tensor, k: int) -> Tensor:
    """Keep each example's k largest pre-activations (ReLU'd), zero the rest."""
    values, indices = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, indices, F.relu(values))


def batch_topk(z: Tensor, k: int, across_ranks: bool = False) -> tuple[Tensor, Tensor]:
    """Keep the k·B largest pre-activations of the whole batch (so examples may use more or fewer than k); with
    `across_ranks`, of the global batch under torchrun (each rank holding its part), as one process would.
    Returns the latents and the smallest kept positive value, from which the inference threshold is estimated."""
    values, indices, largest = distributed.top_of_batch(F.relu(z), k, across_ranks)
    kept = torch.zeros_like(z).flatten().scatter(0, indices, values).view_as(z)
    positive = largest[largest > 0]
    return kept, positive.min() if positive.numel() else z.new_zeros(())


def threshold_activation(z: Tensor, threshold: Tensor) -> Tensor:
    """BatchTopK at inference: `z · 1[z > θ]` with the threshold learned during training."""
    return z * (z > threshold)


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 on (−½, ½), else 0: the kernel of JumpReLU's straight-through estimator."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """`f = z · H(z − θ)`. Gradients: ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε) K((z − θ)/ε) (pseudo-derivative)."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold)
        grad_threshold = (grad * -(threshold / eps) * _rectangle((z - threshold) / eps)).sum(0)
        return grad_z, grad_threshold, None


class _Step(torch.autograd.Function):
    """`H(z − θ)`, JumpReLU's L0. Gradients: none to z; ∂/∂θ = −(1/ε) K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (grad * -(1.0 / eps) * _rectangle((z - threshold) / eps)).sum(0), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU with a per-latent threshold θ > 0 (Rajamanoharan et al. 2024)."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def jumprelu_l0(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Mean over examples of the number of latents above threshold, differentiable in θ."""
    return _Step.apply(z, threshold, bandwidth).sum(-1).mean()
