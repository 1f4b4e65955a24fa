/* The scalar maths of each activation and its derivative, inline: the one
 * home of these formulas for the elementwise kernels (activation.c) and the
 * fused bias + activation of the expert FFN (moe.c).
 *
 *   gelu_tanh(x) = 0.5 x (1 + tanh(u)),  u = c (x + a x^3),  c = sqrt(2/pi), a = 0.044715
 *                = x sigmoid(2u)                      (no cancellation for x << 0)
 *   gelu_tanh'(x) = s + 2 x s (1 - s) c (1 + 3 a x^2),  s = sigmoid(2u)
 *   gelu_erf(x)  = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
 *   gelu_erf'(x) = Phi(x) + x phi(x)
 *   relu(x) = max(x, 0), NaN kept (as PyTorch);  relu'(x) = [not x <= 0]
 *
 * Past |x| = GELU_SATURATE both GELUs are x or -0 and their derivatives 1 or
 * 0 to float precision (|gelu'(-10)| < 1e-21), and the formulas would not
 * give that: dx_expf clamps its argument at -87, so the terms
 * x s (1 - s) x^2 or x phi(x) that should vanish grow with |x| (O(1) past
 * 2e11, -inf or NaN once x^2 overflows).  There the exact values are taken.
 * NaN compares false and goes through the formulas (NaN out). */
#ifndef DAMEX_ACTIVATION_SCALAR_H
#define DAMEX_ACTIVATION_SCALAR_H

#include "fastmath.h"

#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f
#define GELU_INV_SQRT2 0.7071067811865476f
#define GELU_INV_SQRT_2PI 0.3989422804014327f
#define GELU_SATURATE 10.0f

/* x, or 0 x (-0 as PyTorch; NaN at -inf as PyTorch), past the saturation */
static inline float gelu_saturated(float x, float y)
{
    return x > GELU_SATURATE ? x : x < -GELU_SATURATE ? 0.0f * x : y;
}

static inline float gelu_saturated_grad(float x, float d)
{
    return x > GELU_SATURATE ? 1.0f : x < -GELU_SATURATE ? 0.0f : d;
}

static inline float gelu_tanh(float x)
{
    return gelu_saturated(x, x / (1.0f + dx_expf(-2.0f * GELU_C * (x + GELU_A * x * x * x))));
}

static inline float gelu_tanh_grad(float x)
{
    float s = 1.0f / (1.0f + dx_expf(-2.0f * GELU_C * (x + GELU_A * x * x * x)));
    float d = s + 2.0f * x * s * (1.0f - s) * GELU_C * (1.0f + 3.0f * GELU_A * x * x);
    return gelu_saturated_grad(x, d);
}

static inline float gelu_erf(float x)
{
    return gelu_saturated(x, 0.5f * x * (1.0f + dx_erff(x * GELU_INV_SQRT2)));
}

static inline float gelu_erf_grad(float x)
{
    float d = 0.5f * (1.0f + dx_erff(x * GELU_INV_SQRT2)) +
              x * GELU_INV_SQRT_2PI * dx_expf(-0.5f * x * x);
    return gelu_saturated_grad(x, d);
}

static inline float relu(float x)
{
    return x < 0.0f ? 0.0f : x;
}

/* dy where x > 0 or x is NaN (PyTorch's threshold_backward), else 0 */
static inline float relu_grad_times(float x, float dy)
{
    return x <= 0.0f ? 0.0f : dy;
}

#endif
