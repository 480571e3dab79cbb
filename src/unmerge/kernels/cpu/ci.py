"""Fused CPU kernels for SPD's causal importances: the scalar-MLP CI function, and (elementwise, one pass
each way) the two leaky hard sigmoids and the stochastic masks, which eager torch runs as many slow passes.

Stochastic Parameter Decomposition gives every subcomponent ``c`` its own
tiny MLP acting on a scalar::

    out[..., c] = b2[c] + sum_k w2[c, k] * GELU(h[..., c] * w1[c, k] + b1[c, k])

with the exact (erf) GELU.  In eager torch this materialises several
``(rows, C, H)`` tensors and makes a dozen memory passes over them, so
forward plus backward is dominated by memory traffic and ``erf``.

The fused path is a small C kernel (``ci_kernel.c`` beside this file) compiled on
first use with the system C compiler (`unmerge.kernels.cpu.build`), cached on disk
and called through :mod:`ctypes`:

* The weights are transposed to ``(H, C)`` with ``C`` zero-padded to a
  multiple of 8, so the innermost loop runs over ``c`` with unit stride and no
  horizontal reductions, and gcc auto-vectorises it.  Each pass handles four
  rows, which share the weight loads and give the core independent work.
  Nothing of size ``rows * C * H`` is ever stored; the backward pass
  recomputes ``z``, ``Phi(z)`` and ``phi(z)``.
* ``phi(z) = 2^t`` with ``t = -z^2 / (2 ln 2) - log2(sqrt(2 pi))``: integer
  part into the exponent bits, fractional part by a degree-6 polynomial.
  ``Phi(-|z|) = phi(z) * M(|z|)`` with ``M`` the Mills ratio, a degree-6
  polynomial in ``u = q|z| / (1 + q|z|)`` fitted for this kernel (weighted
  minimax, 5e-9 error in ``Phi``).  Evaluated in float32 the error of ``Phi``
  is at most 1.2e-7 (about 2 ulp at 0.5, i.e. 2.3e-7 in ``erf`` terms) and
  that of ``phi`` 5e-8.  The kernel works with ``s = K z`` (``K**2 = log2(e) /
  2``, folded into the weights) so that ``t`` is one fused multiply-add.
* Backward accumulates ``sum_r g d``, ``sum_r g x d`` and ``sum_r g GELU(z)``
  (``d = GELU'(z)``) and multiplies by ``w2`` once at the end, which saves
  work per element.
* Rows are split into ``min(torch.get_num_threads(), rows // 64)`` fixed
  chunks run under OpenMP; weight gradients are summed per chunk and then
  over chunks in order, so results are bitwise repeatable for a given thread
  count.
* No ``-ffast-math``: gcc < 13 links ``crtfastmath.o`` even into shared
  objects, which would switch the whole process to flush-to-zero when the
  library is loaded, and reassociation could cancel the rounding tricks.
  The vector loops have no reductions, so they do not need it.

Which path runs is the caller's explicit choice (SPD: ``method.ci_kernel``).
:func:`scalar_mlp_ci` itself falls back to :func:`scalar_mlp_ci_reference`,
warning once per process with the reason, when an input is not a float32 CPU
tensor or the kernel cannot be compiled or loaded. Inputs are assumed finite
(an infinite pre-activation gives NaN).

The masks' noise r comes from a counter-based hash (``counter_uniform_reference`` is the same map in torch),
so the eager fallback draws exactly the kernel's numbers and the backward pass recomputes r instead of storing it.

``python -m unmerge.kernels.cpu.ci`` prints a single-thread timing comparison.
"""

from __future__ import annotations

import ctypes
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from unmerge.kernels.cpu.build import compile_library, kernel_cache_dir

C_SOURCE = Path(__file__).with_name("ci_kernel.c")


def scalar_mlp_ci_reference(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Eager reference: materialises ``(..., C, H)``; any dtype/device, autograd-differentiable."""
    z = h.unsqueeze(-1) * w1 + b1
    return (F.gelu(z) * w2).sum(-1) + b2


_lock = threading.Lock()
_kernel: tuple[ctypes.CDLL | None, str | None] | None = None


def _load_kernel() -> tuple[ctypes.CDLL | None, str | None]:
    """Compile/load the kernel once per process; return ``(library, None)`` or ``(None, reason)``."""
    global _kernel
    with _lock:
        if _kernel is None:
            try:
                lib = ctypes.CDLL(str(compile_library(C_SOURCE.read_text(), "ci_kernel", kernel_cache_dir())))
                i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
                lib.ci_forward.argtypes = [ptr] * 6 + [i64] * 3 + [i32]
                lib.ci_forward.restype = i32
                lib.ci_backward.argtypes = [ptr] * 10 + [i64] * 3 + [i32] * 4
                lib.ci_backward.restype = i32
                f32 = ctypes.c_float
                lib.hard_sigmoids_forward.argtypes = [ptr] * 3 + [i64, f32, i32]
                lib.hard_sigmoids_forward.restype = None
                lib.hard_sigmoids_backward.argtypes = [ptr] * 4 + [i64, f32, i32]
                lib.hard_sigmoids_backward.restype = None
                u32 = ctypes.c_uint32
                lib.masks_forward.argtypes = [ptr] * 2 + [i64, u32, u32, i32]
                lib.masks_forward.restype = None
                lib.masks_backward.argtypes = [ptr] * 2 + [i64, u32, u32, i32]
                lib.masks_backward.restype = None
                _kernel = (lib, None)
            except (OSError, RuntimeError, AttributeError) as exc:
                _kernel = (None, f"fused CI kernel unavailable: {exc}")
        return _kernel


def fused_kernel_available() -> bool:
    """Whether the compiled kernel builds and loads here."""
    return _load_kernel()[0] is not None


def kernel_unavailable_reason() -> str | None:
    """Why the compiled kernel cannot be built or loaded here, or None when it can."""
    return _load_kernel()[1]


def _fallback_reason(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why the fused path cannot serve these inputs, or ``None`` if it can."""
    if any(t.dtype != torch.float32 for t in tensors):
        return "inputs are not all float32"
    if any(t.device.type != "cpu" for t in tensors):
        return "inputs are not all on the CPU"
    return _load_kernel()[1]


_warned = False


def _warn_fallback(reason: str) -> None:
    """Warn once per process that the slow reference path is being used."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"scalar_mlp_ci: using the eager reference ({reason})", stacklevel=3)


def _num_chunks(rows: int) -> int:
    """Row chunks (= OpenMP threads): ``torch.get_num_threads()``, but at least 64 rows each.

    The chunking depends only on ``rows`` and the thread count, which is what
    makes the weight-gradient reduction bitwise repeatable.
    """
    return max(1, min(torch.get_num_threads(), rows // 64))


def _elementwise_chunks(tensor: torch.Tensor) -> int:
    """Threads for an elementwise kernel: at least 64 Ki elements each, so small tensors stay single-threaded."""
    return _num_chunks(tensor.numel() // 1024)


def _check(code: int, what: str) -> None:
    """Raise if the kernel reported an allocation failure."""
    if code != 0:
        raise MemoryError(f"fused CI kernel could not allocate scratch memory for {what}")


class _FusedScalarMLPCI(torch.autograd.Function):
    """Autograd wrapper around the C kernel; inputs are contiguous float32 CPU tensors, ``h`` 2-D."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        h: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
    ) -> torch.Tensor:
        lib = _load_kernel()[0]
        rows, c = h.shape
        out = torch.empty_like(h)
        code = lib.ci_forward(
            h.data_ptr(),
            w1.data_ptr(),
            b1.data_ptr(),
            w2.data_ptr(),
            b2.data_ptr(),
            out.data_ptr(),
            rows,
            c,
            w1.shape[1],
            _num_chunks(rows),
        )
        _check(code, "forward")
        ctx.save_for_backward(h, w1, b1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        h, w1, b1, w2 = ctx.saved_tensors
        need_h, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        need_w = need_w1 or need_b1 or need_w2
        grad_out = grad_out.contiguous()
        gh = torch.empty_like(h) if need_h else None
        gw1, gb1, gw2 = (torch.empty_like(w1) for _ in range(3)) if need_w else (None, None, None)
        gb2 = h.new_empty(h.shape[1]) if need_b2 else None
        rows, c = h.shape
        code = _load_kernel()[0].ci_backward(
            h.data_ptr(),
            w1.data_ptr(),
            b1.data_ptr(),
            w2.data_ptr(),
            grad_out.data_ptr(),
            *(t.data_ptr() if t is not None else None for t in (gh, gw1, gb1, gw2, gb2)),
            rows,
            c,
            w1.shape[1],
            int(need_h),
            int(need_w),
            int(need_b2),
            _num_chunks(rows),
        )
        _check(code, "backward")
        return (
            gh,
            gw1 if need_w1 else None,
            gb1 if need_b1 else None,
            gw2 if need_w2 else None,
            gb2,
        )


def scalar_mlp_ci(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Fused per-subcomponent scalar MLP: the reference's math and gradients, much faster.

    ``h`` is ``(..., C)``; ``w1``, ``b1``, ``w2`` are ``(C, H)``; ``b2`` is ``(C,)``.
    Differentiable wrt all five inputs (first order only). Falls back to the
    reference, with a one-time warning, when the fused kernel cannot be used.
    """
    if h.dim() < 1 or w1.dim() != 2 or w1.shape[0] != h.shape[-1]:
        raise ValueError(f"h {tuple(h.shape)} and w1 {tuple(w1.shape)}: expected (..., C) and (C, H)")
    if b1.shape != w1.shape or w2.shape != w1.shape or b2.shape != w1.shape[:1]:
        raise ValueError(
            f"b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)} must be "
            f"{tuple(w1.shape)}, {tuple(w1.shape)}, {tuple(w1.shape[:1])}"
        )
    if h.numel() == 0:  # nothing to compute; the reference handles the degenerate shapes
        return scalar_mlp_ci_reference(h, w1, b1, w2, b2)
    reason = _fallback_reason((h, w1, b1, w2, b2))
    if reason is not None:
        _warn_fallback(reason)
        return scalar_mlp_ci_reference(h, w1, b1, w2, b2)
    c = h.shape[-1]
    out = _FusedScalarMLPCI.apply(
        h.reshape(-1, c).contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous()
    )
    return out.reshape(h.shape)


class _FusedHardSigmoids(torch.autograd.Function):
    """Both leaky hard sigmoids in one pass over a contiguous float32 CPU tensor (torch.where is slow here)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, leak: float) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        lower, upper = torch.empty_like(x), torch.empty_like(x)
        _load_kernel()[0].hard_sigmoids_forward(
            x.data_ptr(), lower.data_ptr(), upper.data_ptr(), x.numel(), leak, _elementwise_chunks(x)
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        ctx.leak = leak
        return lower, upper

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_lower: torch.Tensor | None, grad_upper: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        if grad_lower is None and grad_upper is None:
            return None, None
        grads = [g.contiguous() if g is not None else None for g in (grad_lower, grad_upper)]
        grad_x = torch.empty_like(x)
        _load_kernel()[0].hard_sigmoids_backward(
            x.data_ptr(),
            *(g.data_ptr() if g is not None else None for g in grads),
            grad_x.data_ptr(),
            x.numel(),
            ctx.leak,
            _elementwise_chunks(x),
        )
        return grad_x, None


def fused_kernel_serves(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernel can take these tensors (float32, CPU, kernel built, not disabled)."""
    return _fallback_reason(tensors) is None


def fused_hard_sigmoids(x: torch.Tensor, leak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(σ_lower(x), σ_upper(x))` of SPD in one kernel pass; callers check `fused_kernel_serves(x)` first."""
    lower, upper = _FusedHardSigmoids.apply(x.contiguous(), leak)
    return lower, upper


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The kernel's 32-bit "lowbias32" hash on int64 tensors holding 32-bit words (products wrap mod 2^64)."""
    low = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & low
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & low
    return x ^ (x >> 16)


def counter_uniform_reference(
    shape: torch.Size | tuple[int, ...], keys: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """U[0, 1) float32 numbers of the counter-based hash, element i (row-major) = top 24 bits of
    `mix(mix(i + k0) ^ k1)`: bit-identical to what the fused mask kernel draws, on any device."""
    count = torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=device)
    words = _mix32(_mix32((count + keys[0]) & 0xFFFFFFFF) ^ keys[1])
    return ((words >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


class _FusedStochasticMasks(torch.autograd.Function):
    """`g + (1 − g) r` with r from the counter hash, recomputed in backward rather than stored."""

    @staticmethod
    def forward(ctx: FunctionCtx, g: torch.Tensor, k0: int, k1: int) -> torch.Tensor:  # type: ignore[override]
        masks = torch.empty_like(g)
        _load_kernel()[0].masks_forward(g.data_ptr(), masks.data_ptr(), g.numel(), k0, k1, _elementwise_chunks(g))
        ctx.keys = (k0, k1)
        return masks

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_masks: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad_masks = grad_masks.contiguous()
        grad_g = torch.empty_like(grad_masks)
        _load_kernel()[0].masks_backward(
            grad_masks.data_ptr(), grad_g.data_ptr(), grad_masks.numel(), *ctx.keys, _elementwise_chunks(grad_masks)
        )
        return grad_g, None, None


def fused_stochastic_masks(g: torch.Tensor, keys: tuple[int, int]) -> torch.Tensor:
    """`g + (1 − g) r`, `r = counter_uniform_reference(g.shape, keys)`, in one kernel pass each way; callers
    check `fused_kernel_serves(g)` first."""
    return _FusedStochasticMasks.apply(g.contiguous(), *keys)


def _time_fwd_bwd(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor, repeats: int
) -> float:
    """Median milliseconds of one forward+backward of ``fn`` (after two warm-up calls)."""
    times = []
    for i in range(repeats + 2):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        fn(*inputs).backward(grad)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _benchmark() -> None:
    """Print single-thread fwd+bwd timings of the reference and fused versions."""
    torch.set_num_threads(1)
    print(f"fused kernel available: {fused_kernel_available()} ({_load_kernel()[1] or 'ok'})")
    for rows, c, hidden in ((4096, 60, 16), (2048, 200, 16)):
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(rows, c, generator=gen)]
        inputs += [torch.randn(c, hidden, generator=gen) for _ in range(3)]
        inputs += [torch.randn(c, generator=gen)]
        for t in inputs:
            t.requires_grad_(True)
        grad = torch.randn(rows, c, generator=gen)
        ref = _time_fwd_bwd(scalar_mlp_ci_reference, inputs, grad, 15)
        fused = _time_fwd_bwd(scalar_mlp_ci, inputs, grad, 40)
        print(
            f"rows={rows} C={c} H={hidden}, 1 thread, fwd+bwd median: reference {ref:.2f} ms, "
            f"fused {fused:.2f} ms, speedup {ref / fused:.1f}x"
        )


if __name__ == "__main__":
    _benchmark()
