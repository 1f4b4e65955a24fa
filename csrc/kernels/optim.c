/* AdamW and the gradient sum of squares (see optim.h).
 *
 * adamw_step repeats PyTorch's single-tensor AdamW (torch/optim/adamw.py,
 * foreach=False, amsgrad=False) operation by operation: the scalars
 * (decay, bias corrections, step size) in double as Python computes them,
 * rounded to float32 where PyTorch hands them to a float32 tensor op, and
 * every tensor op in float32 in the same order.  PyTorch's vectorised CPU
 * kernels fuse two multiply-adds (lerp_ and addcmul_ use fmadd); fmaf does
 * the same here, so the bits agree with an AVX2/AVX-512 PyTorch build in the
 * vectorised body (its scalar tail of < 8-16 elements may round the unfused
 * way, one float32 ulp apart).  Every other product is kept unfused. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>

#include "status.h"
#include "parallel.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

/* param[n], exp_avg[n], exp_avg_sq[n] updated in place from grad[n]:
 *   param      *= 1 - lr wd                             (skipped when wd == 0)
 *   exp_avg     = lerp(exp_avg, grad, 1 - beta1)        (fused: m + w (g - m))
 *   exp_avg_sq  = exp_avg_sq beta2 + (1 - beta2) grad grad   (fused last add)
 *   denom       = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps
 *   param      += -(lr / (1 - beta1^step)) exp_avg / denom
 * No backward: this is the update itself. */
int adamw_step(float *param, float *exp_avg, float *exp_avg_sq, const float *grad, long n,
               long step, double lr, double beta1, double beta2, double eps, double weight_decay)
{
    if (n < 0 || step < 1 || !(lr >= 0.0) || !(beta1 >= 0.0 && beta1 < 1.0) ||
        !(beta2 >= 0.0 && beta2 < 1.0) || !(eps >= 0.0) || !(weight_decay >= 0.0))
        return DAMEX_EINVAL;
    const int decay_on = weight_decay != 0.0;
    const float decay = (float)(1.0 - lr * weight_decay);
    const double w1d = 1.0 - beta1;        /* lerp weight, as PyTorch branches on it */
    const float w1 = (float)w1d, one_minus_w1 = (float)(1.0 - (double)w1);
    const int lerp_small = fabs(w1d) < 0.5;
    const float b2 = (float)beta2, w2 = (float)(1.0 - beta2);
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    const float neg_step_size = (float)(-(lr / bc1));
    const float bc2_sqrt = (float)sqrt(bc2);
    const float epsf = (float)eps;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ROWS)
    for (long i = 0; i < n; i++) {
        float p = param[i], g = grad[i], m = exp_avg[i], v = exp_avg_sq[i];
        if (decay_on) p = p * decay;
        m = lerp_small ? fmaf(w1, g - m, m) : fmaf(-one_minus_w1, g - m, g);
        v = v * b2;
        v = fmaf(w2 * g, g, v);
        float denom = sqrtf(v) / bc2_sqrt + epsf;
        p = p + neg_step_size * m / denom;
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
    return DAMEX_OK;
}

#define SSQ_BLOCK 8192L

/* sum of x[n]^2 in double with four interleaved accumulators (fixed order) */
static double block_sum_of_squares(const float *x, long n)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)x[i] * x[i];
        s1 += (double)x[i + 1] * x[i + 1];
        s2 += (double)x[i + 2] * x[i + 2];
        s3 += (double)x[i + 3] * x[i + 3];
    }
    for (; i < n; i++) s0 += (double)x[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

/* *out = sum_i x[i]^2: blocks of SSQ_BLOCK summed in parallel into partials,
 * the partials summed in block order, so the bits do not depend on threads. */
int sum_of_squares(double *out, const float *x, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    long nb = (n + SSQ_BLOCK - 1) / SSQ_BLOCK;
    if (nb <= 1) {
        *out = block_sum_of_squares(x, n);
        return DAMEX_OK;
    }
    double *part = (double *)malloc((size_t)nb * sizeof(double));
    if (!part) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) if (nb >= PAR_MIN_SSQ_BLOCKS)
    for (long b = 0; b < nb; b++) {
        long len = n - b * SSQ_BLOCK < SSQ_BLOCK ? n - b * SSQ_BLOCK : SSQ_BLOCK;
        part[b] = block_sum_of_squares(x + b * SSQ_BLOCK, len);
    }
    double s = 0.0;
    for (long b = 0; b < nb; b++) s += part[b];
    free(part);
    *out = s;
    return DAMEX_OK;
}
