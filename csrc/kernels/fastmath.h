/* Branch-free float32 exp / tanh / erf that the compiler vectorises.
 * exp: Cephes-style range reduction + degree-6 polynomial, rel. error ~2e-7.
 * erf: Abramowitz & Stegun 7.1.26, abs. error < 1.5e-7.
 * Inputs are clamped, so no NaN/inf comes out for finite inputs. */
#ifndef DAMEX_FASTMATH_H
#define DAMEX_FASTMATH_H

#include <stdint.h>
#include <string.h>

static inline float dx_expf(float x)
{
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    /* n = round(x / ln2) via the 1.5*2^23 trick */
    float t = x * 1.44269504088896341f + 12582912.0f;
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* tanh(u) = 1 - 2 / (exp(2u) + 1) */
static inline float dx_tanhf(float u)
{
    return 1.0f - 2.0f / (dx_expf(2.0f * u) + 1.0f);
}

static inline float dx_erff(float x)
{
    float s = x < 0.0f ? -1.0f : 1.0f;
    float a = x * s;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float y = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
              t * (-1.453152027f + t * 1.061405429f))));
    return s * (1.0f - y * dx_expf(-a * a));
}

#endif
