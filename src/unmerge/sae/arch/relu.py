"""ReLU: `f = ReLU(z)`, made sparse by the penalty alone. An autoencoder's step runs as one fused function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from unmerge.sae.dictionary import Dictionary


def _autocast_state(device_type: str) -> dict:
    """Whether autocast is on for `device_type` and at which dtype: autograd runs a Function's backward without it."""
    dtype = torch.get_autocast_dtype(device_type)
    return {"device_type": device_type, "dtype": dtype, "enabled": torch.is_autocast_enabled(device_type)}


class _ReLUDictionary(torch.autograd.Function):
    """The whole ReLU dictionary, `z = (x − b_d) W_e + b_e`, `f = relu(z)`, `x̂ = f W_d + b_d`, as one function so
    that its backward does the five products a dense step needs and no more: autograd would also form the B × d
    gradient of `x − b_d` (a sixth product of the same size) because b_d needs a gradient, whereas its share
    through the encoder is the vector `−W_e Σ_b ∂L/∂z[b]`. The latents' gradient from the decoder is accumulated
    into the one from the caller's use of f (a penalty) inside the product, the ReLU mask is applied in place, and
    `∂L/∂W_d` is formed as `(∂L/∂x̂ᵀ f)ᵀ`, which runs faster here than `fᵀ ∂L/∂x̂` (a transposed left operand)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, W_e: Tensor, b_e: Tensor, W_d: Tensor, b_d: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        centred = x - b_d
        z = torch.addmm(b_e, centred, W_e)
        f = F.relu(z)
        ctx.save_for_backward(centred, W_e, W_d, f)
        ctx.set_materialize_grads(False)
        ctx.autocast = _autocast_state(x.device.type)
        return torch.addmm(b_d, f, W_d), f, z

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor | None, grad_f: Tensor | None, grad_z: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        with torch.autocast(**ctx.autocast):  # the products in the precision the forward ran in
            return _ReLUDictionary._backward(ctx, grad_out, grad_f, grad_z)

    @staticmethod
    def _backward(
        ctx: FunctionCtx, grad_out: Tensor | None, grad_f: Tensor | None, grad_z: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        centred, W_e, W_d, f = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_W_d = grad_b_d = None
        if grad_out is not None:
            grad_W_d = (grad_out.T @ f).T if needs[3] else None
            grad_b_d = grad_out.sum(0)
            grad = grad_out @ W_d.T if grad_f is None else torch.addmm(grad_f, grad_out, W_d.T)
            torch.ops.aten.threshold_backward.grad_input(grad, f, 0, grad_input=grad)  # ours: mask in place
        elif grad_f is not None:
            grad = torch.ops.aten.threshold_backward(grad_f, f, 0)
        else:
            grad = None
        if grad_z is not None:
            grad = grad_z if grad is None else grad.add_(grad_z)
        grad_x = grad_W_e = grad_b_e = None
        if grad is not None:
            grad_x = grad @ W_e.T if needs[0] else None
            grad_W_e = centred.T @ grad if needs[1] else None
            grad_b_e = grad.sum(0)
            encoder_b_d = -(W_e @ grad_b_e)
            grad_b_d = encoder_b_d if grad_b_d is None else grad_b_d + encoder_b_d
        return (grad_x, grad_W_e, grad_b_e if needs[2] else None, grad_W_d, grad_b_d if needs[4] else None)


class ReLUDictionary(Dictionary):
    """`f = ReLU(z)`."""

    activation = "relu"
    saelens_name = "standard"
    saelens_transcoders = {False: "transcoder", True: "skip_transcoder"}

    def activate(self, z: Tensor) -> Tensor:
        return F.relu(z)

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """An autoencoder runs as one fused function (`_ReLUDictionary`); a transcoder as the base class does."""
        if self.transcoder:
            return super().forward_normalised(x)
        return _ReLUDictionary.apply(x, self.W_e, self.b_e, self.W_d, self.b_d)
