/* Row softmax with the max subtracted; rows in parallel.  Entries more than
 * 87 below the row max (including -inf) give exactly 0. */
#include "softmax.h"

#include "fastmath.h"
#include "reduce.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"

DAMEX_CLONES
static float row_max(const float *restrict x, long C)
{
    float acc[DX_LANES];
    for (int l = 0; l < DX_LANES; l++) acc[l] = x[0];
    long c = 0;
    for (; c + DX_LANES <= C; c += DX_LANES)
        for (int l = 0; l < DX_LANES; l++) acc[l] = x[c + l] > acc[l] ? x[c + l] : acc[l];
    float m = x[0];
    for (; c < C; c++) m = x[c] > m ? x[c] : m;
    for (int l = 0; l < DX_LANES; l++) m = acc[l] > m ? acc[l] : m;
    return m;
}

DAMEX_CLONES
static void row_exp(float *restrict y, const float *restrict x, float m, long C)
{
    for (long c = 0; c < C; c++) {
        float d = x[c] - m;
        y[c] = d < -87.0f ? 0.0f : dx_expf(d);
    }
}

DAMEX_CLONES
static void row_scale(float *restrict y, float s, long C)
{
    for (long c = 0; c < C; c++) y[c] *= s;
}

int softmax_forward(float *y, const float *x, long R, long C)
{
    if (R < 0 || C <= 0) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if (R * C > PAR_MIN_ROWS)
    for (long r = 0; r < R; r++) {
        float *yr = y + r * C;
        row_exp(yr, x + r * C, row_max(x + r * C, C), C);
        row_scale(yr, (float)(1.0 / dx_sum(yr, C)), C);
    }
    return DAMEX_OK;
}

/* sum_c a[c] b[c] */
DAMEX_CLONES
static float row_dot(const float *restrict a, const float *restrict b, long C)
{
    float acc[DX_LANES] = {0};
    long c = 0;
    for (; c + DX_LANES <= C; c += DX_LANES)
        for (int l = 0; l < DX_LANES; l++) acc[l] += a[c + l] * b[c + l];
    float s = 0.0f;
    for (; c < C; c++) s += a[c] * b[c];
    for (int l = 0; l < DX_LANES; l++) s += acc[l];
    return s;
}

DAMEX_CLONES
static void row_softmax_bwd(float *restrict dx, const float *restrict dy, const float *restrict y,
                            float s, long C)
{
    for (long c = 0; c < C; c++) dx[c] += y[c] * (dy[c] - s);
}

int softmax_backward(float *dx, const float *dy, const float *y, long R, long C)
{
    if (R < 0 || C <= 0) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if (R * C > PAR_MIN_ROWS)
    for (long r = 0; r < R; r++)
        row_softmax_bwd(dx + r * C, dy + r * C, y + r * C, row_dot(dy + r * C, y + r * C, C), C);
    return DAMEX_OK;
}
