/* Accurate, vectorisable float sums for the normalisation kernels: 16 float
 * lanes over blocks of 1024 elements, the block sums added in double, so a
 * group of 10^5 elements keeps ~1e-7 relative error without -ffast-math. */
#ifndef DAMEX_REDUCE_H
#define DAMEX_REDUCE_H

#define DX_LANES 16
#define DX_BLOCK 1024

/* sum_i x[i] */
static inline double dx_sum(const float *restrict x, long n)
{
    double total = 0.0;
    for (long i = 0; i < n; i += DX_BLOCK) {
        long m = n - i < DX_BLOCK ? n - i : DX_BLOCK, j = 0;
        float acc[DX_LANES] = {0};
        for (; j + DX_LANES <= m; j += DX_LANES)
            for (int l = 0; l < DX_LANES; l++) acc[l] += x[i + j + l];
        float s = 0.0f;
        for (; j < m; j++) s += x[i + j];
        for (int l = 0; l < DX_LANES; l++) s += acc[l];
        total += s;
    }
    return total;
}

/* sum_i (x[i] - c)^2 */
static inline double dx_sumsq_dev(const float *restrict x, float c, long n)
{
    double total = 0.0;
    for (long i = 0; i < n; i += DX_BLOCK) {
        long m = n - i < DX_BLOCK ? n - i : DX_BLOCK, j = 0;
        float acc[DX_LANES] = {0};
        for (; j + DX_LANES <= m; j += DX_LANES)
            for (int l = 0; l < DX_LANES; l++) {
                float d = x[i + j + l] - c;
                acc[l] += d * d;
            }
        float s = 0.0f;
        for (; j < m; j++) s += (x[i + j] - c) * (x[i + j] - c);
        for (int l = 0; l < DX_LANES; l++) s += acc[l];
        total += s;
    }
    return total;
}

/* sum_i a[i] * (x[i] - c) */
static inline double dx_dot_dev(const float *restrict a, const float *restrict x, float c, long n)
{
    double total = 0.0;
    for (long i = 0; i < n; i += DX_BLOCK) {
        long m = n - i < DX_BLOCK ? n - i : DX_BLOCK, j = 0;
        float acc[DX_LANES] = {0};
        for (; j + DX_LANES <= m; j += DX_LANES)
            for (int l = 0; l < DX_LANES; l++) acc[l] += a[i + j + l] * (x[i + j + l] - c);
        float s = 0.0f;
        for (; j < m; j++) s += a[i + j] * (x[i + j] - c);
        for (int l = 0; l < DX_LANES; l++) s += acc[l];
        total += s;
    }
    return total;
}

#endif
