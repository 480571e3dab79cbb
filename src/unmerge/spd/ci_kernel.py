"""Fused CPU kernels for SPD's causal importances: the scalar-MLP CI function, and (elementwise, one pass
each way) the two leaky hard sigmoids and the stochastic masks, which eager torch runs as many slow passes.

Stochastic Parameter Decomposition gives every subcomponent ``c`` its own
tiny MLP acting on a scalar::

    out[..., c] = b2[c] + sum_k w2[c, k] * GELU(h[..., c] * w1[c, k] + b1[c, k])

with the exact (erf) GELU.  In eager torch this materialises several
``(rows, C, H)`` tensors and makes a dozen memory passes over them, so
forward plus backward is dominated by memory traffic and ``erf``.

The fused path is a small C kernel (``_C_SOURCE``) compiled on first use with
the system C compiler, cached on disk and called through :mod:`ctypes`:

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

:func:`scalar_mlp_ci` falls back to :func:`scalar_mlp_ci_reference`, warning
once per process with the reason, when ``UNMERGE_DISABLE_FUSED_CI=1``, when
an input is not a float32 CPU tensor, or when the kernel cannot be compiled or
loaded.  Inputs are assumed finite (an infinite pre-activation gives NaN).
The library is cached in ``kernels/`` under ``$UNMERGE_CACHE_DIR`` (default
``~/.cache/unmerge``) under a hash of source, compiler, flags, machine
and CPU flags.

The masks' noise r comes from a counter-based hash (``counter_uniform_reference`` is the same map in torch),
so the eager fallback draws exactly the kernel's numbers and the backward pass recomputes r instead of storing it.

``python -m unmerge.spd.ci_kernel`` prints a single-thread timing comparison.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["counter_uniform_reference", "fused_hard_sigmoids", "fused_kernel_available", "fused_kernel_serves",
           "fused_stochastic_masks", "scalar_mlp_ci", "scalar_mlp_ci_reference"]

_DISABLE_ENV = "UNMERGE_DISABLE_FUSED_CI"
_CACHE_ENV = "UNMERGE_CACHE_DIR"

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PAD 8   /* C is zero-padded to a multiple of this many floats (32 bytes) */
#define ROWS 4  /* rows processed together by fwd_unit / bwd_unit */
#define FLUSH_ROWS 256  /* backward sums are flushed into chunk totals this often */

/* The kernel works with s = K * z, K = sqrt(log2(e) / 2), so that
   phi(z) = 2^(-s^2) / sqrt(2 pi).  K is folded into the weights (w1, b1 scaled
   by K, w2 by 1/K) and into the constants below, saving a multiply per element. */
#define K_SCALE 8.493218003e-01f
#define INV_K_SCALE 1.177410023e+00f

static inline float from_bits(uint32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
static inline uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, sizeof b); return b; }

/* Phi(z) and phi(z) / K for s = K z, branch-free.
   phi / K = 2^t, t = -s^2 - log2(K sqrt(2 pi)), clamped at -100 (an unsigned
   min on the bits, t being negative).  t = n + f: the shifter rounds t to the
   integer n, which it leaves in the low mantissa bits of kf; 2^f is a degree-6
   minimax polynomial on [-1/2, 1/2] and 2^n is added into its exponent bits.
   Phi(-|z|) = phi(z) M(|z|), M the Mills ratio: a degree-6 polynomial in
   u = q|z| / (1 + q|z|), q = 0.35, fitted (minimax weighted by phi) to 5e-9
   absolute error in Phi; its coefficients carry the factor K. */
static inline void norm_cdf_pdf(float s, float *cdf, float *pdf_k)
{
    const float shifter = 12582912.0f;  /* 1.5 * 2^23 */
    float t = -1.090131251e+00f - s * s;
    uint32_t tb = to_bits(t), lim = to_bits(-100.0f);
    t = from_bits(tb < lim ? tb : lim);
    float kf = t + shifter;
    float f = t - (kf - shifter);
    float p = 1.534579181e-04f;
    p = p * f + 1.339992937e-03f;
    p = p * f + 9.618489007e-03f;
    p = p * f + 5.550328782e-02f;
    p = p * f + 2.402264689e-01f;
    p = p * f + 6.931472057e-01f;
    p = p * f + 1.000000001e+00f;
    float d = from_bits(to_bits(p) + (to_bits(kf) << 23));

    float a = from_bits(to_bits(s) & 0x7fffffffu);
    float u = a / (2.426633715e+00f + a);  /* = q|z| / (1 + q|z|) */
    float m = 1.045842477e-01f;
    m = m * u + 2.805986013e-02f;
    m = m * u - 3.390606747e-01f;
    m = m * u - 3.393140952e-01f;
    m = m * u + 1.918054783e+00f;
    m = m * u - 2.426631447e+00f;
    m = m * u + 1.064467008e+00f;
    /* 1/2 - Phi(-|z|) >= 0 carrying the sign of z */
    *cdf = 0.5f + from_bits(to_bits(0.5f - d * m) | (to_bits(s) & 0x80000000u));
    *pdf_k = d;
}

/* Forward for one hidden unit k of a block of ROWS rows, all (padded) c:
   acc += w2 GELU(z) with s = K z = x w1 + b1, i.e. w1, b1 pre-scaled by K and
   w2 by 1/K.  x and acc are (ROWS, n) blocks; the rows share the weight loads
   and give the core independent work.  32-byte aligned, n % PAD == 0. */
static inline void fwd_unit(const float *restrict x, const float *restrict w1,
                            const float *restrict b1, const float *restrict w2,
                            float *restrict acc, int64_t n)
{
    x = __builtin_assume_aligned(x, 32);
    w1 = __builtin_assume_aligned(w1, 32);
    b1 = __builtin_assume_aligned(b1, 32);
    w2 = __builtin_assume_aligned(w2, 32);
    acc = __builtin_assume_aligned(acc, 32);
    #pragma GCC ivdep  /* the ROWS row slices never overlap: no run-time alias checks */
    for (int64_t c = 0; c < n; c++) {
        #pragma GCC unroll 8
        for (int j = 0; j < ROWS; j++) {
            float s = x[j * n + c] * w1[c] + b1[c];
            float cdf, pdf;
            norm_cdf_pdf(s, &cdf, &pdf);
            acc[j * n + c] += w2[c] * (s * cdf);
        }
    }
}

/* Backward for one hidden unit k of a block of ROWS rows, s = K z from the
   K-scaled w1, b1 as in fwd_unit.  With d = GELU'(z) = Phi + s phi / K and
   upstream gradient g it accumulates the w2-free sums
     ghp += w1 w2 d (per row),  sgd += g d,  sgxd += g x d,  sgg += g s Phi;
   the caller scales them: grad_h = g ghp, grad_b1 = w2 sgd, grad_w1 = w2 sgxd,
   grad_w2 = sgg / K.  w12 holds the unscaled w1 w2; x, g, gx = g x and ghp
   are (ROWS, n) blocks.  Without need_w only ghp is accumulated. */
static inline void bwd_unit(const float *restrict x, const float *restrict g,
                            const float *restrict gx, const float *restrict w1,
                            const float *restrict b1, const float *restrict w12,
                            float *restrict ghp, float *restrict sgd,
                            float *restrict sgxd, float *restrict sgg, int64_t n,
                            int need_w)
{
    x = __builtin_assume_aligned(x, 32);
    g = __builtin_assume_aligned(g, 32);
    gx = __builtin_assume_aligned(gx, 32);
    w1 = __builtin_assume_aligned(w1, 32);
    b1 = __builtin_assume_aligned(b1, 32);
    w12 = __builtin_assume_aligned(w12, 32);
    ghp = __builtin_assume_aligned(ghp, 32);
    sgd = __builtin_assume_aligned(sgd, 32);
    sgxd = __builtin_assume_aligned(sgxd, 32);
    sgg = __builtin_assume_aligned(sgg, 32);
    if (need_w) {
        #pragma GCC ivdep
        for (int64_t c = 0; c < n; c++) {
            float a_gd = sgd[c], a_gxd = sgxd[c], a_gg = sgg[c];
            #pragma GCC unroll 8
            for (int j = 0; j < ROWS; j++) {
                float s = x[j * n + c] * w1[c] + b1[c];
                float cdf, pdf;
                norm_cdf_pdf(s, &cdf, &pdf);
                float d = cdf + s * pdf;
                ghp[j * n + c] += w12[c] * d;
                a_gd += g[j * n + c] * d;
                a_gxd += gx[j * n + c] * d;
                a_gg += g[j * n + c] * (s * cdf);
            }
            sgd[c] = a_gd;
            sgxd[c] = a_gxd;
            sgg[c] = a_gg;
        }
    } else {
        #pragma GCC ivdep
        for (int64_t c = 0; c < n; c++) {
            #pragma GCC unroll 8
            for (int j = 0; j < ROWS; j++) {
                float s = x[j * n + c] * w1[c] + b1[c];
                float cdf, pdf;
                norm_cdf_pdf(s, &cdf, &pdf);
                ghp[j * n + c] += w12[c] * (cdf + s * pdf);
            }
        }
    }
}

static int64_t padded(int64_t c) { return (c + PAD - 1) / PAD * PAD; }

/* Zeroed, 64-byte aligned buffer of n floats (NULL on failure); row offsets
   are multiples of PAD floats, so every row starts 32-byte aligned. */
static float *alloc_floats(int64_t n)
{
    size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

/* scale * (C, H) row-major -> (H, cp) row-major; padding stays zero. */
static void transpose_in(const float *src, float *dst, int64_t C, int64_t H, int64_t cp,
                         float scale)
{
    for (int64_t c = 0; c < C; c++)
        for (int64_t k = 0; k < H; k++)
            dst[k * cp + c] = scale * src[c * H + k];
}

/* Rows [lo, hi) of chunk `chunk` when `rows` are split into `nchunks` blocks. */
static void chunk_bounds(int64_t rows, int nchunks, int chunk, int64_t *lo, int64_t *hi)
{
    int64_t per = (rows + nchunks - 1) / nchunks;
    *lo = per * chunk < rows ? per * chunk : rows;
    *hi = *lo + per < rows ? *lo + per : rows;
}

/* out (rows, C) = b2 + sum_k w2 GELU(h w1 + b1).  Returns nonzero if out of memory. */
int ci_forward(const float *h, const float *w1, const float *b1, const float *w2,
               const float *b2, float *out, int64_t rows, int64_t C, int64_t H,
               int nchunks)
{
    int64_t cp = padded(C), hc = H * cp;
    float *wt = alloc_floats(3 * hc);
    float *scratch = alloc_floats(2 * ROWS * cp * nchunks);
    if (!wt || !scratch) { free(wt); free(scratch); return 1; }
    transpose_in(w1, wt, C, H, cp, K_SCALE);
    transpose_in(b1, wt + hc, C, H, cp, K_SCALE);
    transpose_in(w2, wt + 2 * hc, C, H, cp, INV_K_SCALE);

    #pragma omp parallel for schedule(static, 1) num_threads(nchunks)
    for (int chunk = 0; chunk < nchunks; chunk++) {
        float *x = scratch + 2 * ROWS * cp * chunk, *acc = x + ROWS * cp;
        int64_t lo, hi;
        chunk_bounds(rows, nchunks, chunk, &lo, &hi);
        for (int64_t r = lo; r < hi; r += ROWS) {
            int64_t nr = hi - r < ROWS ? hi - r : ROWS;  /* block rows >= nr are discarded */
            for (int64_t j = 0; j < nr; j++) memcpy(x + j * cp, h + (r + j) * C, C * sizeof(float));
            for (int64_t j = 0; j < ROWS; j++) memcpy(acc + j * cp, b2, C * sizeof(float));
            for (int64_t k = 0; k < H; k++)
                fwd_unit(x, wt + k * cp, wt + hc + k * cp, wt + 2 * hc + k * cp, acc, cp);
            for (int64_t j = 0; j < nr; j++) memcpy(out + (r + j) * C, acc + j * cp, C * sizeof(float));
        }
    }
    free(wt);
    free(scratch);
    return 0;
}

/* Gradients of ci_forward for upstream gradient gout (rows, C).  gh is written
   if need_h, gw1/gb1/gw2 (C, H) if need_w, gb2 (C) if need_b2; weight
   gradients are summed per chunk, then over chunks in order (deterministic).
   Returns nonzero if out of memory. */
int ci_backward(const float *h, const float *w1, const float *b1, const float *w2,
                const float *gout, float *gh, float *gw1, float *gb1, float *gw2,
                float *gb2, int64_t rows, int64_t C, int64_t H, int need_h,
                int need_w, int need_b2, int nchunks)
{
    int64_t cp = padded(C), hc = H * cp;
    /* Per chunk: running sums sgd, sgxd, sgg (H, cp) and sum of g (cp), plus
       their totals.  Two-level summation keeps the float error of long row
       ranges near that of FLUSH_ROWS-row sums. */
    int64_t part = 3 * hc + cp;
    float *wt = alloc_floats(3 * hc);
    float *scratch = alloc_floats(4 * ROWS * cp * nchunks);
    float *parts = alloc_floats(2 * part * nchunks);
    if (!wt || !scratch || !parts) { free(wt); free(scratch); free(parts); return 1; }
    float *w1t = wt, *b1t = wt + hc, *w12t = wt + 2 * hc;
    transpose_in(w1, w1t, C, H, cp, 1.0f);
    transpose_in(w2, w12t, C, H, cp, 1.0f);
    for (int64_t i = 0; i < hc; i++) {
        w12t[i] *= w1t[i];
        w1t[i] *= K_SCALE;
    }
    transpose_in(b1, b1t, C, H, cp, K_SCALE);

    #pragma omp parallel for schedule(static, 1) num_threads(nchunks)
    for (int chunk = 0; chunk < nchunks; chunk++) {
        /* x, g, g * x and ghp blocks, each (ROWS, cp) */
        float *x = scratch + 4 * ROWS * cp * chunk, *g = x + ROWS * cp;
        float *gx = x + 2 * ROWS * cp, *ghp = x + 3 * ROWS * cp;
        float *total = parts + 2 * part * chunk, *sgd = total + part;
        float *sgxd = sgd + hc, *sgg = sgd + 2 * hc, *sg = sgd + 3 * hc;
        int64_t lo, hi;
        chunk_bounds(rows, nchunks, chunk, &lo, &hi);
        for (int64_t r = lo; r < hi; r += ROWS) {
            int64_t nr = hi - r < ROWS ? hi - r : ROWS;  /* block rows >= nr get g = 0 */
            if (r > lo && (r - lo) % FLUSH_ROWS == 0)
                for (int64_t i = 0; i < part; i++) {
                    total[i] += sgd[i];
                    sgd[i] = 0.0f;
                }
            for (int64_t j = 0; j < nr; j++) {
                memcpy(x + j * cp, h + (r + j) * C, C * sizeof(float));
                memcpy(g + j * cp, gout + (r + j) * C, C * sizeof(float));
            }
            memset(g + nr * cp, 0, (ROWS - nr) * cp * sizeof(float));
            for (int64_t i = 0; i < ROWS * cp; i++) {
                gx[i] = g[i] * x[i];
                ghp[i] = 0.0f;
            }
            for (int64_t j = 0; j < ROWS; j++)
                for (int64_t c = 0; c < cp; c++) sg[c] += g[j * cp + c];
            for (int64_t k = 0; k < H; k++)
                bwd_unit(x, g, gx, w1t + k * cp, b1t + k * cp, w12t + k * cp, ghp,
                         sgd + k * cp, sgxd + k * cp, sgg + k * cp, cp, need_w);
            if (need_h)
                for (int64_t j = 0; j < nr; j++)
                    for (int64_t c = 0; c < C; c++)
                        gh[(r + j) * C + c] = g[j * cp + c] * ghp[j * cp + c];
        }
        for (int64_t i = 0; i < part; i++) total[i] += sgd[i];
    }

    for (int chunk = 1; chunk < nchunks; chunk++) {
        const float *src = parts + 2 * part * chunk;
        for (int64_t i = 0; i < part; i++) parts[i] += src[i];
    }
    if (need_w)
        for (int64_t c = 0; c < C; c++)
            for (int64_t k = 0; k < H; k++) {
                float w2ck = w2[c * H + k];
                gb1[c * H + k] = w2ck * parts[k * cp + c];
                gw1[c * H + k] = w2ck * parts[hc + k * cp + c];
                gw2[c * H + k] = INV_K_SCALE * parts[2 * hc + k * cp + c];
            }
    if (need_b2) memcpy(gb2, parts + 3 * hc, C * sizeof(float));
    free(wt);
    free(scratch);
    free(parts);
    return 0;
}
/* SPD's two leaky hard sigmoids of gamma in one pass (the torch formulas, elementwise):
   lower = x > 0 ? min(x, 1) : leak x;  upper = x > 1 ? 1 + leak (x - 1) : max(x, 0). */
void hard_sigmoids_forward(const float *x, float *lower, float *upper, int64_t n, float leak, int nthreads)
{
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float below_one = v < 1.0f ? v : 1.0f;
        float above_zero = v > 0.0f ? v : 0.0f;
        lower[i] = v > 0.0f ? below_one : leak * v;
        upper[i] = v > 1.0f ? 1.0f + leak * (v - 1.0f) : above_zero;
    }
}

/* Their gradient, as torch's autograd of the formulas above defines it (clamp passes the gradient at the
   boundary); either upstream gradient may be NULL. */
void hard_sigmoids_backward(const float *x, const float *glower, const float *gupper, float *gx, int64_t n,
                            float leak, int nthreads)
{
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float dl = v > 0.0f ? (v <= 1.0f ? 1.0f : 0.0f) : leak;
        float du = v > 1.0f ? leak : (v >= 0.0f ? 1.0f : 0.0f);
        gx[i] = (glower ? glower[i] * dl : 0.0f) + (gupper ? gupper[i] * du : 0.0f);
    }
}
/* Stochastic masks m = g + (1 - g) r with r ~ U[0, 1) from a counter-based hash: r_i is the top 24 bits of
   mix(mix(i + k0) ^ k1), mix the "lowbias32" integer hash (xorshift-multiply, a bijection of 32-bit words).
   The backward pass recomputes r instead of storing it. counter_uniform_reference in Python is the same map. */
static inline uint32_t mix32(uint32_t x)
{
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

static inline float counter_uniform(int64_t i, uint32_t k0, uint32_t k1)
{
    return (float)(mix32(mix32((uint32_t)i + k0) ^ k1) >> 8) * 5.9604644775390625e-08f;
}

void masks_forward(const float *g, float *m, int64_t n, uint32_t k0, uint32_t k1, int nthreads)
{
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i++) m[i] = g[i] + (1.0f - g[i]) * counter_uniform(i, k0, k1);
}

void masks_backward(const float *gm, float *gg, int64_t n, uint32_t k0, uint32_t k1, int nthreads)
{
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i++) gg[i] = gm[i] * (1.0f - counter_uniform(i, k0, k1));
}
"""

_BASE_FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    # Register-pressure-aware pre-allocation scheduling: ~15% faster backward
    # with gcc 12 (the unit loops interleave four long dependency chains).
    "-fschedule-insns",
    "-fsched-pressure",
    "-shared",
    "-fPIC",
)
_FLAG_SETS = (_BASE_FLAGS + ("-fopenmp",), _BASE_FLAGS)


def scalar_mlp_ci_reference(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Eager reference: materialises ``(..., C, H)``; any dtype/device, autograd-differentiable."""
    z = h.unsqueeze(-1) * w1 + b1
    return (F.gelu(z) * w2).sum(-1) + b2


def _cache_dir() -> Path:
    """Directory for compiled kernels: ``kernels/`` under ``$UNMERGE_CACHE_DIR`` or ``~/.cache/unmerge``."""
    env = os.environ.get(_CACHE_ENV)
    return (Path(env) if env else Path.home() / ".cache" / "unmerge") / "kernels"


def _cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo (empty if unavailable): ``-march=native`` depends on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return ""


def _compile_kernel(cache_dir: Path) -> Path:
    """Return a compiled shared library in ``cache_dir``, building it if absent.

    Tries OpenMP flags first, then without. The output is compiled to a
    temporary name and moved into place atomically so concurrent processes
    never load a partial file. Raises ``RuntimeError`` naming the failure.
    """
    compiler = shutil.which(os.environ.get("CC") or "gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        key = "\0".join([_C_SOURCE, compiler, *flags, platform.machine(), _cpu_flags()])
        target = cache_dir / f"ci_kernel_{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "ci_kernel.c"
            src.write_text(_C_SOURCE)
            fd, partial = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
            os.close(fd)
            try:
                proc = subprocess.run(
                    [compiler, *flags, "-o", partial, str(src)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if proc.returncode == 0:
                    os.replace(partial, target)
                    return target
                errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
            except subprocess.TimeoutExpired:
                errors.append(f"{' '.join(flags)}: compiler timed out")
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
    raise RuntimeError("kernel compilation failed: " + " | ".join(errors))


_lock = threading.Lock()
_kernel: tuple[ctypes.CDLL | None, str | None] | None = None


def _load_kernel() -> tuple[ctypes.CDLL | None, str | None]:
    """Compile/load the kernel once per process; return ``(library, None)`` or ``(None, reason)``."""
    global _kernel
    with _lock:
        if _kernel is None:
            try:
                lib = ctypes.CDLL(str(_compile_kernel(_cache_dir())))
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
    """Whether the compiled kernel builds and loads here (ignores ``UNMERGE_DISABLE_FUSED_CI``)."""
    return _load_kernel()[0] is not None


def _fallback_reason(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why the fused path cannot serve these inputs, or ``None`` if it can."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return f"{_DISABLE_ENV} is set"
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
            h.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
            out.data_ptr(), rows, c, w1.shape[1], _num_chunks(rows),
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
            h.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), grad_out.data_ptr(),
            *(t.data_ptr() if t is not None else None for t in (gh, gw1, gb1, gw2, gb2)),
            rows, c, w1.shape[1], int(need_h), int(need_w), int(need_b2), _num_chunks(rows),
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
            x.data_ptr(), *(g.data_ptr() if g is not None else None for g in grads), grad_x.data_ptr(),
            x.numel(), ctx.leak, _elementwise_chunks(x),
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


def counter_uniform_reference(shape: torch.Size | tuple[int, ...], keys: tuple[int, int]) -> torch.Tensor:
    """U[0, 1) float32 numbers of the counter-based hash, element i (row-major) = top 24 bits of
    `mix(mix(i + k0) ^ k1)`: bit-identical to what the fused mask kernel draws."""
    count = torch.arange(torch.Size(shape).numel(), dtype=torch.int64)
    words = _mix32(_mix32((count + keys[0]) & 0xFFFFFFFF) ^ keys[1])
    return ((words >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


class _FusedStochasticMasks(torch.autograd.Function):
    """`g + (1 − g) r` with r from the counter hash, recomputed in backward rather than stored."""

    @staticmethod
    def forward(ctx: FunctionCtx, g: torch.Tensor, k0: int, k1: int) -> torch.Tensor:  # type: ignore[override]
        masks = torch.empty_like(g)
        _load_kernel()[0].masks_forward(g.data_ptr(), masks.data_ptr(), g.numel(), k0, k1,
                                        _elementwise_chunks(g))
        ctx.keys = (k0, k1)
        return masks

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_masks: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad_masks = grad_masks.contiguous()
        grad_g = torch.empty_like(grad_masks)
        _load_kernel()[0].masks_backward(grad_masks.data_ptr(), grad_g.data_ptr(), grad_masks.numel(), *ctx.keys,
                                         _elementwise_chunks(grad_masks))
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
