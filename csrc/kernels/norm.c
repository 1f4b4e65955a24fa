/* Layer norm, group norm and frozen batch norm, forward and backward.
 * Statistics: two passes (mean, then squared deviations) with the sums of
 * reduce.h; parameter gradients go through per-thread partial sums (layer
 * norm) or a per-(n, c) scratch table (group norm), never a shared +=. */
#include "norm.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "reduce.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"

#ifdef _OPENMP
#include <omp.h>
#define DX_THREADS() omp_get_max_threads()
#define DX_TID() omp_get_thread_num()
#else
#define DX_THREADS() 1
#define DX_TID() 0
#endif

/* y = (x - m) * s * gamma + beta over one row of C */
DAMEX_CLONES
static void normalize_row(float *restrict y, const float *restrict x, float m, float s,
                          const float *restrict gamma, const float *restrict beta, long C)
{
    for (long c = 0; c < C; c++) y[c] = (x[c] - m) * s * gamma[c] + beta[c];
}

/* mean and 1/sqrt(var + eps) of one row: two passes, `omp simd` sums in vector
 * lanes (a target clone, so AVX-512 where the CPU has it).  Returns 0 when a
 * float sum overflowed (a row of entries past ~1e19, or a long row of them
 * past ~1e18): layer_norm_row_wide then redoes the row. */
DAMEX_CLONES
static int row_moments(float *mean, float *rstd, const float *restrict x, long C, float eps)
{
    float s = 0.0f, q = 0.0f;
    long c;
#pragma omp simd reduction(+ : s)
    for (c = 0; c < C; c++) s += x[c];
    float m = s / C;
#pragma omp simd reduction(+ : q)
    for (c = 0; c < C; c++) q += (x[c] - m) * (x[c] - m);
    *mean = m;
    *rstd = 1.0f / sqrtf(q / C + eps);
    return q <= FLT_MAX; /* false for inf and NaN */
}

/* The same row with the moments and the normalisation in double, where every
 * finite float input stays finite ((x - m)^2 <= 4.7e77): rows around 1e30
 * give their normalised values, not beta (PyTorch's float32 kernel overflows
 * there and gives NaN, or 0 for some rows; its float64 kernel gives these
 * values).  NaN or inf in the row still gives NaN. */
static void layer_norm_row_wide(float *restrict y, float *mean, float *rstd,
                                const float *restrict x, const float *restrict gamma,
                                const float *restrict beta, long C, float eps)
{
    double s = 0.0, q = 0.0;
    for (long c = 0; c < C; c++) s += x[c];
    const double m = s / C;
    for (long c = 0; c < C; c++) q += ((double)x[c] - m) * ((double)x[c] - m);
    const double r = 1.0 / sqrt(q / C + eps);
    for (long c = 0; c < C; c++) y[c] = (float)(((double)x[c] - m) * r) * gamma[c] + beta[c];
    *mean = (float)m;
    *rstd = (float)r;
}

int layer_norm_forward(float *y, float *mean, float *rstd, const float *x, const float *gamma,
                       const float *beta, int N, int C, float eps)
{
    if (N < 0 || C <= 0 || !(eps >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if ((long)N * C > PAR_MIN_NORM)
    for (long n = 0; n < N; n++) {
        if (row_moments(mean + n, rstd + n, x + n * C, C, eps))
            normalize_row(y + n * C, x + n * C, mean[n], rstd[n], gamma, beta, C);
        else
            layer_norm_row_wide(y + n * C, mean + n, rstd + n, x + n * C, gamma, beta, C, eps);
    }
    return DAMEX_OK;
}

/* One row of the layer norm backward; adds dy*xhat, dy into pg, pb.
 * `omp simd reduction` lets the two row sums vectorise (reassociated). */
DAMEX_CLONES
static void layer_norm_row_backward(float *restrict dx, float *restrict pg, float *restrict pb,
                                    const float *restrict dy, const float *restrict x, float m,
                                    float s, const float *restrict gamma, long C)
{
    float sg = 0.0f, sgx = 0.0f;
    long c;
#pragma omp simd reduction(+ : sg, sgx)
    for (c = 0; c < C; c++) {
        float g = dy[c] * gamma[c];
        sg += g;
        sgx += g * ((x[c] - m) * s);
    }
    float m1 = sg / C, m2 = sgx / C;
    for (c = 0; c < C; c++) {
        float xhat = (x[c] - m) * s;
        pg[c] += dy[c] * xhat;
        pb[c] += dy[c];
        dx[c] += s * (dy[c] * gamma[c] - m1 - xhat * m2);
    }
}

int layer_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                        const float *mean, const float *rstd, const float *gamma, int N, int C)
{
    if (N < 0 || C <= 0) return DAMEX_EINVAL;
    int T = (long)N * C > PAR_MIN_NORM ? DX_THREADS() : 1;
    float *part = calloc((size_t)T * 2 * C, sizeof(float)); /* [T][dgamma C | dbeta C] */
    if (!part) return DAMEX_ENOMEM;
#pragma omp parallel num_threads(T)
    {
        float *pg = part + (size_t)DX_TID() * 2 * C, *pb = pg + C;
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            layer_norm_row_backward(dx + n * C, pg, pb, dy + n * C, x + n * C, mean[n], rstd[n],
                                    gamma, C);
    }
    for (int t = 0; t < T; t++)
        for (long c = 0; c < C; c++) {
            dgamma[c] += part[(size_t)t * 2 * C + c];
            dbeta[c] += part[(size_t)t * 2 * C + C + c];
        }
    free(part);
    return DAMEX_OK;
}

DAMEX_CLONES
static void affine_plane(float *restrict y, const float *restrict x, float scale, float shift,
                         long n)
{
    for (long i = 0; i < n; i++) y[i] = x[i] * scale + shift;
}

int group_norm_forward(float *y, float *mean, float *rstd, const float *x, const float *gamma,
                       const float *beta, int N, int C, long HW, int G, float eps)
{
    if (N < 0 || C <= 0 || HW < 0 || G <= 0 || C % G || !(eps >= 0.0f)) return DAMEX_EINVAL;
    const int Cg = C / G;
    const long M = (long)Cg * HW;
    if (M == 0) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if ((long)N * C * HW > PAR_MIN_NORM)
    for (long ng = 0; ng < (long)N * G; ng++) {
        const float *xg = x + ng * M;
        float m = (float)(dx_sum(xg, M) / M);
        float var = (float)(dx_sumsq_dev(xg, m, M) / M);
        float s = 1.0f / sqrtf(var + eps);
        mean[ng] = m;
        rstd[ng] = s;
        int c0 = (int)(ng % G) * Cg;
        for (int j = 0; j < Cg; j++) {
            float scale = s * gamma[c0 + j];
            affine_plane(y + ng * M + j * HW, xg + j * HW, scale, beta[c0 + j] - m * scale, HW);
        }
    }
    return DAMEX_OK;
}

/* dx[i] += s * (dy[i] * gm - m1 - (x[i] - m) * s * m2) */
DAMEX_CLONES
static void group_norm_plane_backward(float *restrict dx, const float *restrict dy,
                                      const float *restrict x, float m, float s, float gm,
                                      float m1, float m2, long n)
{
    for (long i = 0; i < n; i++) dx[i] += s * (dy[i] * gm - m1 - (x[i] - m) * s * m2);
}

int group_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                        const float *mean, const float *rstd, const float *gamma, int N, int C,
                        long HW, int G)
{
    if (N < 0 || C <= 0 || HW < 0 || G <= 0 || C % G) return DAMEX_EINVAL;
    const int Cg = C / G;
    const long M = (long)Cg * HW;
    if (M == 0) return DAMEX_EINVAL;
    /* A[n,c] = sum_hw dy * xhat,  B[n,c] = sum_hw dy */
    double *A = malloc(sizeof(double) * 2 * ((size_t)N * C + 1)), *B = A + (size_t)N * C;
    if (!A) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) if ((long)N * C * HW > PAR_MIN_NORM)
    for (long ng = 0; ng < (long)N * G; ng++) {
        const long base = ng * M;
        const float m = mean[ng], s = rstd[ng];
        const int c0 = (int)(ng % G) * Cg;
        const long nc0 = (ng / G) * C + c0;
        double sg = 0.0, sgx = 0.0;
        for (int j = 0; j < Cg; j++) {
            A[nc0 + j] = dx_dot_dev(dy + base + j * HW, x + base + j * HW, m, HW) * s;
            B[nc0 + j] = dx_sum(dy + base + j * HW, HW);
            sg += gamma[c0 + j] * B[nc0 + j];
            sgx += gamma[c0 + j] * A[nc0 + j];
        }
        float m1 = (float)(sg / M), m2 = (float)(sgx / M);
        for (int j = 0; j < Cg; j++)
            group_norm_plane_backward(dx + base + j * HW, dy + base + j * HW, x + base + j * HW,
                                      m, s, gamma[c0 + j], m1, m2, HW);
    }
    for (int c = 0; c < C; c++) {
        double sa = 0.0, sb = 0.0;
        for (int n = 0; n < N; n++) {
            sa += A[(long)n * C + c];
            sb += B[(long)n * C + c];
        }
        dgamma[c] += (float)sa;
        dbeta[c] += (float)sb;
    }
    free(A);
    return DAMEX_OK;
}

int frozen_batch_norm_forward(float *y, const float *x, const float *weight, const float *bias,
                              const float *running_mean, const float *running_var, int N, int C,
                              long HW, float eps)
{
    if (N < 0 || C < 0 || HW < 0 || !(eps >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if ((long)N * C * HW > PAR_MIN_NORM)
    for (long nc = 0; nc < (long)N * C; nc++) {
        int c = (int)(nc % C);
        float scale = weight[c] * (1.0f / sqrtf(running_var[c] + eps));
        affine_plane(y + nc * HW, x + nc * HW, scale, bias[c] - running_mean[c] * scale, HW);
    }
    return DAMEX_OK;
}

DAMEX_CLONES
static void axpy_plane(float *restrict dx, const float *restrict dy, float scale, long n)
{
    for (long i = 0; i < n; i++) dx[i] += dy[i] * scale;
}

int frozen_batch_norm_backward(float *dx, const float *dy, const float *weight,
                               const float *running_var, int N, int C, long HW, float eps)
{
    if (N < 0 || C < 0 || HW < 0 || !(eps >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if ((long)N * C * HW > PAR_MIN_NORM)
    for (long nc = 0; nc < (long)N * C; nc++) {
        int c = (int)(nc % C);
        /* inverts y = x * scale + shift,  scale = weight / sqrt(running_var + eps) */
        axpy_plane(dx + nc * HW, dy + nc * HW, weight[c] * (1.0f / sqrtf(running_var[c] + eps)),
                   HW);
    }
    return DAMEX_OK;
}
