/* Fused CPU kernels for SPD's causal importances; see unmerge/kernels/cpu/ci.py for the design. */
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
