/* GELU (tanh and erf forms) and ReLU, elementwise; the formulas are in
 * activation_scalar.h. */
#include "activation.h"

#include "activation_scalar.h"
#include "status.h"
#include "cpu.h"

DAMEX_CLONES
static void gelu_tanh_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) y[i] = gelu_tanh(x[i]);
}

DAMEX_CLONES
static void gelu_tanh_bwd(float *restrict dx, const float *restrict dy, const float *restrict x,
                          long n)
{
    for (long i = 0; i < n; i++) dx[i] += dy[i] * gelu_tanh_grad(x[i]);
}

DAMEX_CLONES
static void gelu_erf_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) y[i] = gelu_erf(x[i]);
}

DAMEX_CLONES
static void gelu_erf_bwd(float *restrict dx, const float *restrict dy, const float *restrict x,
                         long n)
{
    for (long i = 0; i < n; i++) dx[i] += dy[i] * gelu_erf_grad(x[i]);
}

DAMEX_CLONES
static void relu_fwd(float *restrict y, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) y[i] = relu(x[i]);
}

DAMEX_CLONES
static void relu_bwd(float *restrict dx, const float *restrict dy, const float *restrict x, long n)
{
    for (long i = 0; i < n; i++) dx[i] += relu_grad_times(x[i], dy[i]);
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
