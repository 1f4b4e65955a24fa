/* GELU (tanh and erf forms) and ReLU.
 *   gelu_tanh(x) = 0.5 x (1 + tanh(c (x + 0.044715 x^3))),  c = sqrt(2/pi)
 *   gelu_erf(x)  = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
 *   relu(x)      = max(x, 0)                                              */
#include "activation.h"

#include "fastmath.h"
#include "status.h"

#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

DAMEX_CLONES
static void gelu_tanh_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) {
        float v = x[i]; /* 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation for v << 0 */
        y[i] = v / (1.0f + dx_expf(-2.0f * GELU_C * (v + GELU_A * v * v * v)));
    }
}

DAMEX_CLONES
static void gelu_tanh_bwd(float *restrict dx, const float *restrict dy, const float *restrict x,
                          long n)
{
    for (long i = 0; i < n; i++) {
        float v = x[i];
        /* s = 0.5 (1 + tanh(u)) = sigmoid(2u);  0.5 (1 - tanh^2 u) = 2 s (1 - s) */
        float s = 1.0f / (1.0f + dx_expf(-2.0f * GELU_C * (v + GELU_A * v * v * v)));
        float d = s + 2.0f * v * s * (1.0f - s) * GELU_C * (1.0f + 3.0f * GELU_A * v * v);
        dx[i] += dy[i] * d;
    }
}

DAMEX_CLONES
static void gelu_erf_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + dx_erff(v * INV_SQRT2));
    }
}

DAMEX_CLONES
static void gelu_erf_bwd(float *restrict dx, const float *restrict dy, const float *restrict x,
                         long n)
{
    for (long i = 0; i < n; i++) {
        float v = x[i];
        float d = 0.5f * (1.0f + dx_erff(v * INV_SQRT2)) + v * INV_SQRT_2PI * dx_expf(-0.5f * v * v);
        dx[i] += dy[i] * d;
    }
}

DAMEX_CLONES
static void relu_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

DAMEX_CLONES
static void relu_bwd(float *restrict dx, const float *restrict dy, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) dx[i] += x[i] > 0.0f ? dy[i] : 0.0f;
}

int activation_forward(float *y, const float *x, long n, int act)
{
    switch (act) {
    case DAMEX_ACT_GELU_TANH: gelu_tanh_fwd(y, x, n); return DAMEX_OK;
    case DAMEX_ACT_GELU_ERF: gelu_erf_fwd(y, x, n); return DAMEX_OK;
    case DAMEX_ACT_RELU: relu_fwd(y, x, n); return DAMEX_OK;
    default: return DAMEX_EINVAL;
    }
}

int activation_backward(float *dx, const float *dy, const float *x, long n, int act)
{
    switch (act) {
    case DAMEX_ACT_GELU_TANH: gelu_tanh_bwd(dx, dy, x, n); return DAMEX_OK;
    case DAMEX_ACT_GELU_ERF: gelu_erf_bwd(dx, dy, x, n); return DAMEX_OK;
    case DAMEX_ACT_RELU: relu_bwd(dx, dy, x, n); return DAMEX_OK;
    default: return DAMEX_EINVAL;
    }
}
