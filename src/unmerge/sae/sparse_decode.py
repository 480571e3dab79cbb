"""TopK dictionaries without dense latents on the gradient path: each example's k active latents are kept as
(values B × k, indices B × k), and the decoder and the encoder's backward touch only those B·k entries.

    x̂ = Σ_j values[b, j] · W_d[indices[b, j]] + b_d                   (`sparse_decode`)
    z = (x − b_d) W_e + b_e,  (values, indices) = relu(top-k of z)     (`topk_encode`)

A dense step of a d → m → d dictionary costs five (B × d)·(d × m) products; with these, TopK needs only the
encoder's forward product and the top-k selection over z, plus O(B·k·d) work for everything else:

* decoder forward: a weighted sum of k atoms per example (`embedding_bag`);
* ∂L/∂values[b, j] = W_d[indices[b, j]] · ∂L/∂x̂[b]: the product ∂L/∂x̂ W_dᵀ sampled at the active entries only;
* ∂L/∂W_d = Fᵀ ∂L/∂x̂ and ∂L/∂W_eᵀ = Gᵀ (x − b_d), with F and G the sparse B × m latents and their gradient
  ∂L/∂z: one sparse (m × B) · dense (B × d) product each, over the transposed layout (entries grouped by latent);
* ∂L/∂b_e = Σ_b G[b] (an index_add of the B·k entries) and the encoder's share of ∂L/∂b_d, −(Σ_b G[b]) W_eᵀ:
  a vector, never the B × d gradient of the centred input (the input needs no gradient in a dictionary).

At d = 256, m = 1024, B = 4096, k = 16 on one thread, a TopK training step takes 76 ms this way, 100 ms with
the encoder's weight gradient as a dense product (and 195 ms fully dense); `benchmarks/dictionary_speed.py`.
The sparse products run on torch's CSR kernels; the layouts are built from the indices (a sort of the B·k latent
indices for the transposed one). Nothing loops over examples or latents in Python.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _csr(crow: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch says CSR support is "beta" once per process; the ops used are stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, columns, values, shape, check_invariants=False)


def _by_example(values: Tensor, indices: Tensor, width: int) -> Tensor:
    """The B × m latents as CSR: row b holds its k entries (columns in top-k order, not sorted)."""
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)
    return _csr(crow, indices.reshape(-1), values.reshape(-1), (batch, width))


class _ByLatent:
    """The transposed (m × B) layout of B × k active entries: entries grouped by latent (a stable sort), so that
    `Fᵀ D` for a dense B × d matrix D is one CSR product."""

    def __init__(self, indices: Tensor, width: int) -> None:
        batch, k = indices.shape
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        self.crow = torch.zeros(width + 1, dtype=torch.int64, device=indices.device)
        torch.cumsum(torch.bincount(flat, minlength=width), 0, out=self.crow[1:])
        self.examples = torch.div(self.order, k, rounding_mode="floor")
        self.shape = (width, batch)

    def transposed_matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """`Fᵀ dense` (m × d) for the sparse B × m matrix F with `values` (B × k) at this layout's entries."""
        return _csr(self.crow, self.examples, values.reshape(-1)[self.order], self.shape) @ dense


def _sampled_product(values: Tensor, indices: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """`(left @ right)[b, indices[b, j]]` as a B × k tensor, computing only those B·k dot products."""
    pattern = _by_example(values, indices, right.shape[1])
    return torch.sparse.sampled_addmm(pattern, left, right, beta=0.0).values().view_as(values)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        values: Tensor,
        indices: Tensor,
        W_d: Tensor,  # type: ignore[override]
        b_d: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(values, indices, W_d)
        return F.embedding_bag(indices, W_d, per_sample_weights=values, mode="sum").add_(b_d)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, indices, W_d = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_W_d = grad_b_d = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_product(values, indices, grad, W_d.T)
        if ctx.needs_input_grad[2]:
            grad_W_d = _ByLatent(indices, W_d.shape[0]).transposed_matmul(values, grad)
        if ctx.needs_input_grad[3]:
            grad_b_d = grad.sum(0)
        return grad_values, None, grad_W_d, grad_b_d


def sparse_decode(values: Tensor, indices: Tensor, W_d: Tensor, b_d: Tensor) -> Tensor:
    """`x̂[b] = Σ_j values[b, j] W_d[indices[b, j]] + b_d`, equal to `f @ W_d + b_d` for the dense latents f
    with `values` at `indices`, without forming f; differentiable in values, W_d and b_d. The sparse products run
    in W_d's dtype (bf16 values from an autocast encoder are cast up: these products are small)."""
    return _SparseDecode.apply(values.to(W_d.dtype), indices, W_d, b_d)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        W_e: Tensor,
        b_e: Tensor,
        b_d: Tensor,  # type: ignore[override]
        k: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        centred = x - b_d
        z = torch.addmm(b_e, centred, W_e)
        top, indices = z.topk(k, dim=-1, sorted=False)
        values = top.clamp_min_(0)
        ctx.save_for_backward(centred, W_e, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return values, indices, z

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx,
        grad_values: Tensor | None,
        _: None,  # type: ignore[override]
        grad_z: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, None]:
        centred, W_e, values, indices = ctx.saved_tensors
        # autograd runs this without autocast: work in the weights' dtype whatever the forward's products ran in
        grad_values, grad_z, values = (None if t is None else t.to(W_e.dtype) for t in (grad_values, grad_z, values))
        width = W_e.shape[1]
        grad_x = grad_W_e = grad_b_e = None
        if grad_values is not None:  # through the kept, ReLU'd pre-activations: G[b, indices[b, j]]
            sparse = grad_values * (values > 0)
            if ctx.needs_input_grad[1]:
                grad_W_e = _ByLatent(indices, width).transposed_matmul(sparse, centred).T
            grad_b_e = torch.zeros(width, dtype=sparse.dtype, device=sparse.device)
            grad_b_e.index_add_(0, indices.reshape(-1), sparse.reshape(-1))
            if ctx.needs_input_grad[0]:
                grad_x = _by_example(sparse, indices, width) @ W_e.T
        if grad_z is not None:  # dense use of z (AuxK): the ordinary products
            dense_W_e = centred.T @ grad_z
            grad_W_e = dense_W_e if grad_W_e is None else grad_W_e + dense_W_e
            grad_b_e = grad_z.sum(0) if grad_b_e is None else grad_b_e + grad_z.sum(0)
            if ctx.needs_input_grad[0]:
                dense_x = grad_z @ W_e.T
                grad_x = dense_x if grad_x is None else grad_x + dense_x
        if grad_b_e is None:
            return None, None, None, None, None
        grad_b_d = -(W_e @ grad_b_e) if ctx.needs_input_grad[3] else None
        return grad_x, grad_W_e, grad_b_e if ctx.needs_input_grad[2] else None, grad_b_d, None


def topk_encode(x: Tensor, W_e: Tensor, b_e: Tensor, b_d: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each example's k largest pre-activations `z = (x − b_d) W_e + b_e`, ReLU'd: (values B × k, indices B × k,
    z B × m). The gradient through `values` reaches only those B·k entries of z and is computed sparsely; a
    gradient through `z` itself (AuxK) is added densely."""
    return _TopKEncode.apply(x, W_e, b_e, b_d, k)


def dense_latents(values: Tensor, indices: Tensor, width: int) -> Tensor:
    """The B × m latents with `values` at `indices` and zeros elsewhere (differentiable in values)."""
    return values.new_zeros(values.shape[0], width).scatter_(-1, indices, values)  # in place: no copy of the zeros
