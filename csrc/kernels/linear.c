/* Linear layer: one sgemm each way.  The bias is written into y first and the
 * sgemm accumulates onto it (beta = 1), so no second pass over y is needed. */
#include "linear.h"

#include <string.h>

#include "blas.h"
#include "status.h"
#include "parallel.h"

/* Rows of y filled with the bias per OpenMP chunk: the sgemm that follows
 * reads them back from cache. */
int linear_forward(float *y, const float *x, const float *w, const float *b, int N, int Din,
                   int Dout)
{
    if (N < 0 || Din < 0 || Dout < 0) return DAMEX_EINVAL;
    if (N == 0 || Dout == 0) return DAMEX_OK;
    if (b) {
#pragma omp parallel for schedule(static) if ((long)N * Dout > PAR_MIN_ROWS)
        for (long n = 0; n < N; n++) memcpy(y + n * Dout, b, sizeof(float) * Dout);
    }
    /* y = x @ w^T (+ y) */
    sgemm_rm(0, 1, N, Dout, Din, 1.0f, x, Din, w, Din, b ? 1.0f : 0.0f, y, Dout);
    return DAMEX_OK;
}

/* out[c] += sum_r a[r, c].  Each thread owns a block of columns (disjoint
 * outputs); rows are the outer loop so the inner loop is contiguous. */
void column_sums_accumulate(float *out, const float *a, long R, long C)
{
    const long blk = 256;
    long nblk = (C + blk - 1) / blk;
#pragma omp parallel for schedule(static) if (R * C > PAR_MIN_ROWS)
    for (long j = 0; j < nblk; j++) {
        long c0 = j * blk, c1 = c0 + blk < C ? c0 + blk : C;
        float acc[256];
        for (long c = c0; c < c1; c++) acc[c - c0] = 0.0f;
        for (long r = 0; r < R; r++) {
            const float *row = a + r * C;
            for (long c = c0; c < c1; c++) acc[c - c0] += row[c];
        }
        for (long c = c0; c < c1; c++) out[c] += acc[c - c0];
    }
}

int linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, int N, int Din, int Dout)
{
    if (N < 0 || Din < 0 || Dout < 0) return DAMEX_EINVAL;
    /* dx += dy @ w                 (inverts y = x @ w^T) */
    if (dx) sgemm_rm(0, 0, N, Din, Dout, 1.0f, dy, Dout, w, Din, 1.0f, dx, Din);
    /* dw += dy^T @ x               (inverts y = x @ w^T) */
    if (dw) sgemm_rm(1, 0, Dout, Din, N, 1.0f, dy, Dout, x, Din, 1.0f, dw, Din);
    /* db += sum_n dy[n]            (inverts y += b) */
    if (db) column_sums_accumulate(db, dy, N, Dout);
    return DAMEX_OK;
}
