/* sigmoid, inverse sigmoid (DINO's clamped form) and dropout. */
#include "elementwise.h"

#include <math.h>

#include "fastmath.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"


DAMEX_CLONES
static void sigmoid_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) y[i] = 1.0f / (1.0f + dx_expf(-x[i]));
}

int sigmoid_forward(float *y, const float *x, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    const long blk = 16384;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i += blk) sigmoid_fwd(y + i, x + i, n - i < blk ? n - i : blk);
    return DAMEX_OK;
}

DAMEX_CLONES
static void sigmoid_bwd(float *restrict dx, const float *restrict dy, const float *restrict y,
                        long n)
{
    for (long i = 0; i < n; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]);
}

int sigmoid_backward(float *dx, const float *dy, const float *y, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    const long blk = 16384;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i += blk)
        sigmoid_bwd(dx + i, dy + i, y + i, n - i < blk ? n - i : blk);
    return DAMEX_OK;
}

int inverse_sigmoid_forward(float *y, const float *x, long n, float eps)
{
    if (n < 0 || !(eps >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i++) {
        float v = x[i] < 0.0f ? 0.0f : (x[i] > 1.0f ? 1.0f : x[i]);
        float x1 = v > eps ? v : eps, x2 = 1.0f - v > eps ? 1.0f - v : eps;
        y[i] = logf(x1 / x2);
    }
    return DAMEX_OK;
}

int inverse_sigmoid_backward(float *dx, const float *dy, const float *x, long n, float eps)
{
    if (n < 0 || !(eps >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i++) {
        /* inverts y = log(max(v, eps) / max(1 - v, eps)),  v = clamp(x, 0, 1) */
        float xi = x[i];
        if (!(xi >= 0.0f && xi <= 1.0f)) continue;
        float u = 1.0f - xi, d = 0.0f;
        if (xi >= eps) d += 1.0f / xi;
        if (u >= eps) d += 1.0f / u;
        dx[i] += dy[i] * d;
    }
    return DAMEX_OK;
}

/* splitmix64's output function: a bijective mix of a 64-bit counter. */
static inline uint64_t splitmix64_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static float dropout_scale(float p) { return p < 1.0f ? 1.0f / (1.0f - p) : 0.0f; }

DAMEX_CLONES
static void dropout_fwd(float *restrict y, uint8_t *restrict keep, const float *restrict x,
                        long i0, long n, uint32_t threshold, float scale, uint64_t seed)
{
    for (long i = 0; i < n; i++) {
        uint64_t bits = splitmix64_mix(seed + (uint64_t)(i0 + i + 1) * 0x9E3779B97F4A7C15ULL);
        uint8_t k = (uint32_t)(bits >> 40) >= threshold;
        keep[i] = k;
        y[i] = k ? x[i] * scale : 0.0f;
    }
}

int dropout_forward(float *y, uint8_t *keep, const float *x, long n, float p, uint64_t seed)
{
    if (n < 0 || !(p >= 0.0f && p <= 1.0f)) return DAMEX_EINVAL;
    /* keep with probability 1 - p:  P(bits24 >= round(p 2^24)) = 1 - round(p 2^24) / 2^24 */
    uint32_t threshold = (uint32_t)llroundf(p * 16777216.0f);
    float scale = dropout_scale(p);
    const long blk = 16384;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i += blk)
        dropout_fwd(y + i, keep + i, x + i, i, n - i < blk ? n - i : blk, threshold, scale, seed);
    return DAMEX_OK;
}

DAMEX_CLONES
static void dropout_bwd(float *restrict dx, const float *restrict dy,
                        const uint8_t *restrict keep, long n, float scale)
{
    for (long i = 0; i < n; i++) dx[i] += keep[i] ? dy[i] * scale : 0.0f;
}

int dropout_backward(float *dx, const float *dy, const uint8_t *keep, long n, float p)
{
    if (n < 0 || !(p >= 0.0f && p <= 1.0f)) return DAMEX_EINVAL;
    const long blk = 16384;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i += blk)
        dropout_bwd(dx + i, dy + i, keep + i, n - i < blk ? n - i : blk, dropout_scale(p));
    return DAMEX_OK;
}
