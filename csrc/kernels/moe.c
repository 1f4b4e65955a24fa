/* Dispatch, expert FFN and combine (see moe.h for shapes and formulas).
 *
 * Threads: large gathers/scatters use OpenMP with a static schedule over
 * disjoint rows (tokens for combine and dispatch backward, so no atomics).  The expert FFN
 * runs one sgemm per block of one expert's rows (never a row of another
 * expert), on OpenMP threads with single-threaded BLAS: see the note above
 * expert_ffn_forward.  Bias gradients are per-block column sums reduced in
 * block order, so results do not depend on scheduling. */
#include "moe.h"

#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "activation.h"
#include "activation_scalar.h"
#include "blas.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"

/* rows[T*k] = packed row of each choice, -1 where dropped; checks that every
 * kept choice is inside its expert's range and that the kept choices cover
 * rows 0..N-1 exactly once. */
static int routing_rows(int64_t *rows, const int64_t *expert_index, const int64_t *slot,
                        const int64_t *expert_count, int T, int k, int E, long N)
{
    if (T < 0 || k < 1 || E < 1 || N < 0) return DAMEX_EINVAL;
    int64_t *offset = malloc((size_t)E * sizeof *offset);
    unsigned char *seen = calloc((size_t)N + 1, 1);
    int status = DAMEX_OK;
    if (!offset || !seen) {
        status = DAMEX_ENOMEM;
        goto done;
    }
    long total = 0;
    for (int e = 0; e < E; e++) {
        int64_t c = expert_count[e];
        if (c < 0 || c > N - total) {
            status = DAMEX_EINDEX;
            goto done;
        }
        offset[e] = total;
        total += (long)c;
    }
    if (total != N) {
        status = DAMEX_EINDEX;
        goto done;
    }
    long kept = 0;
    for (long i = 0; i < (long)T * k; i++) {
        int64_t s = slot[i];
        if (s == -1) {
            rows[i] = -1;
            continue;
        }
        int64_t e = expert_index[i];
        if (s < 0 || e < 0 || e >= E || s >= expert_count[e]) {
            status = DAMEX_EINDEX;
            goto done;
        }
        int64_t r = offset[e] + s;
        if (seen[r]) {
            status = DAMEX_EINDEX;
            goto done;
        }
        seen[r] = 1;
        rows[i] = r;
        kept++;
    }
    if (kept != N) status = DAMEX_EINDEX;
done:
    free(offset);
    free(seen);
    return status;
}

/* routing_rows into a new array the caller frees; NULL, with *status set, on error. */
static int64_t *new_routing_rows(int *status, const int64_t *expert_index, const int64_t *slot,
                                 const int64_t *expert_count, int T, int k, int E, long N)
{
    *status = T < 0 || k < 1 ? DAMEX_EINVAL : DAMEX_ENOMEM;
    int64_t *rows = *status == DAMEX_EINVAL ? NULL : malloc(((size_t)T * k + 1) * sizeof(int64_t));
    if (!rows) return NULL;
    *status = routing_rows(rows, expert_index, slot, expert_count, T, k, E, N);
    if (*status != DAMEX_OK) {
        free(rows);
        return NULL;
    }
    return rows;
}

/* ---- dispatch ------------------------------------------------------------- */

int dispatch_forward(float *xe, const float *x, const int64_t *expert_index, const int64_t *slot,
                     const int64_t *expert_count, int T, int k, int D, int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int status;
    int64_t *rows = new_routing_rows(&status, expert_index, slot, expert_count, T, k, E, N);
    if (!rows) return status;
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN_GATHER)
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int64_t r = rows[(long)t * k + j];
            if (r >= 0) memcpy(xe + r * D, x + (long)t * D, (size_t)D * sizeof(float));
        }
    free(rows);
    return DAMEX_OK;
}

/* inverts "xe[row(t,j)] = x[t]" */
int dispatch_backward(float *dx, const float *dxe, const int64_t *expert_index,
                      const int64_t *slot, const int64_t *expert_count, int T, int k, int D,
                      int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int status;
    int64_t *rows = new_routing_rows(&status, expert_index, slot, expert_count, T, k, E, N);
    if (!rows) return status;
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN_GATHER)
    for (int t = 0; t < T; t++) {
        float *restrict d = dx + (long)t * D;
        for (int j = 0; j < k; j++) {
            int64_t r = rows[(long)t * k + j];
            if (r < 0) continue;
            const float *restrict g = dxe + r * D;
            for (int i = 0; i < D; i++) d[i] += g[i];
        }
    }
    free(rows);
    return DAMEX_OK;
}

/* ---- combine -------------------------------------------------------------- */

int combine_forward(float *y, const float *ye, const float *combine_weight,
                    const int64_t *expert_index, const int64_t *slot, const int64_t *expert_count,
                    int T, int k, int D, int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int status;
    int64_t *rows = new_routing_rows(&status, expert_index, slot, expert_count, T, k, E, N);
    if (!rows) return status;
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN_GATHER)
    for (int t = 0; t < T; t++) {
        float *restrict yt = y + (long)t * D;
        memset(yt, 0, (size_t)D * sizeof(float));
        for (int j = 0; j < k; j++) {
            int64_t r = rows[(long)t * k + j];
            if (r < 0) continue;
            float w = combine_weight[(long)t * k + j];
            const float *restrict src = ye + r * D;
            for (int i = 0; i < D; i++) yt[i] += w * src[i];
        }
    }
    free(rows);
    return DAMEX_OK;
}

/* inverts "y[t] = sum_j w[t,j] * ye[row(t,j)]" */
int combine_backward(float *dye, float *dcombine_weight, const float *dy, const float *ye,
                     const float *combine_weight, const int64_t *expert_index,
                     const int64_t *slot, const int64_t *expert_count, int T, int k, int D,
                     int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int status;
    int64_t *rows = new_routing_rows(&status, expert_index, slot, expert_count, T, k, E, N);
    if (!rows) return status;
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN_GATHER)
    for (int t = 0; t < T; t++) {
        const float *restrict g = dy + (long)t * D;
        for (int j = 0; j < k; j++) {
            int64_t r = rows[(long)t * k + j];
            if (r < 0) continue;
            float w = combine_weight[(long)t * k + j];
            float *restrict d = dye + r * D;
            const float *restrict v = ye + r * D;
            float dot = 0.0f;
            for (int i = 0; i < D; i++) {
                d[i] += w * g[i];
                dot += g[i] * v[i];
            }
            dcombine_weight[(long)t * k + j] += dot;
        }
    }
    free(rows);
    return DAMEX_OK;
}

/* ---- fused bias + activation, one row of F ------------------------------- */

/* h[i] += b[i]; a[i] = act(h[i]) */
DAMEX_CLONES
static void bias_gelu_tanh(float *restrict h, float *restrict a, const float *restrict b, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i] + b[i];
        h[i] = v;
        a[i] = gelu_tanh(v);
    }
}

DAMEX_CLONES
static void bias_gelu_erf(float *restrict h, float *restrict a, const float *restrict b, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i] + b[i];
        h[i] = v;
        a[i] = gelu_erf(v);
    }
}

DAMEX_CLONES
static void bias_relu(float *restrict h, float *restrict a, const float *restrict b, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i] + b[i];
        h[i] = v;
        a[i] = relu(v);
    }
}

/* inverts "a = act(h)" in place: g[i] = g[i] * act'(h[i]); db[i] += g[i] */
DAMEX_CLONES
static void dgelu_tanh(float *restrict g, float *restrict db, const float *restrict h, int F)
{
    for (int i = 0; i < F; i++) {
        float r = g[i] * gelu_tanh_grad(h[i]);
        g[i] = r;
        db[i] += r;
    }
}

DAMEX_CLONES
static void dgelu_erf(float *restrict g, float *restrict db, const float *restrict h, int F)
{
    for (int i = 0; i < F; i++) {
        float r = g[i] * gelu_erf_grad(h[i]);
        g[i] = r;
        db[i] += r;
    }
}

DAMEX_CLONES
static void drelu(float *restrict g, float *restrict db, const float *restrict h, int F)
{
    for (int i = 0; i < F; i++) {
        float r = relu_grad_times(h[i], g[i]);
        g[i] = r;
        db[i] += r;
    }
}

DAMEX_CLONES
static void add_row(float *restrict acc, const float *restrict v, int n)
{
    for (int i = 0; i < n; i++) acc[i] += v[i];
}

/* ---- expert FFN ------------------------------------------------------------ */

/* Threads (blas_single_thread_begin/end in blas.h).  Two pools spinning on the same cores (OpenBLAS's pthreads and
 * OpenMP's) slow each other down badly when an OpenMP pass sits between two
 * threaded GEMMs, and OpenBLAS's pthreads server must not be entered from an
 * OpenMP loop.  So the expert FFN runs on the OpenMP pool only: OpenBLAS is
 * switched to one thread for the duration of the call (restored after, with a
 * count so concurrent calls from several Python threads stay correct), and
 * OpenMP threads take tasks (a block of rows of one expert, or a column block
 * of one expert's weight gradient) with dynamic scheduling, each task one
 * single-threaded sgemm plus its fused elementwise work on data still in cache. */
/* Rows per task: big enough for sgemm to run near its peak, small enough to
 * balance the threads and keep a block of h/a in L2. */
#define BLOCK_ROWS 256
/* Columns of F per weight-gradient task. */
#define BLOCK_COLS 256

typedef struct {
    int e;    /* expert */
    long r0;  /* first packed row */
    int n;    /* rows */
} row_block;

static int check_ffn(const int64_t *expert_count, int E, int D, int F, long N, int act)
{
    if (E < 1 || D < 1 || F < 1 || N < 0) return DAMEX_EINVAL;
    if (act != DAMEX_ACT_GELU_TANH && act != DAMEX_ACT_GELU_ERF && act != DAMEX_ACT_RELU)
        return DAMEX_EINVAL;
    long total = 0;
    for (int e = 0; e < E; e++) {
        if (expert_count[e] < 0 || expert_count[e] > N - total) return DAMEX_EINDEX;
        total += (long)expert_count[e];
    }
    return total == N ? DAMEX_OK : DAMEX_EINDEX;
}

/* Splits every expert's rows into near-equal blocks of at most BLOCK_ROWS;
 * returns the block count, or -1 when out of memory. */
static long row_blocks(row_block **out, const int64_t *expert_count, int E)
{
    long nblk = 0;
    for (int e = 0; e < E; e++) nblk += (expert_count[e] + BLOCK_ROWS - 1) / BLOCK_ROWS;
    row_block *b = malloc(((size_t)nblk + 1) * sizeof *b);
    if (!b) return -1;
    long i = 0, off = 0;
    for (int e = 0; e < E; e++) {
        long n = (long)expert_count[e];
        long m = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
        for (long j = 0; j < m; j++) {
            long lo = n * j / m, hi = n * (j + 1) / m;
            b[i].e = e;
            b[i].r0 = off + lo;
            b[i].n = (int)(hi - lo);
            i++;
        }
        off += n;
    }
    *out = b;
    return nblk;
}

int expert_ffn_forward(float *ye, float *h, float *a, const float *xe, const float *w1,
                       const float *b1, const float *w2, const float *b2,
                       const int64_t *expert_count, int E, int D, int F, long N, int act)
{
    int status = check_ffn(expert_count, E, D, F, N, act);
    if (status != DAMEX_OK) return status;
    row_block *blk;
    long nblk = row_blocks(&blk, expert_count, E);
    if (nblk < 0) return DAMEX_ENOMEM;
    int par = nblk > 1 && (long)N * D * F >= PAR_MIN_FFN;
    if (par) blas_single_thread_begin();
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (long i = 0; i < nblk; i++) {
        int e = blk[i].e, n = blk[i].n;
        long r0 = blk[i].r0;
        float *h_b = h + r0 * F, *a_b = a + r0 * F, *y_b = ye + r0 * D;
        const float *b1_e = b1 + (long)e * F, *b2_e = b2 + (long)e * D;
        /* h = xe @ w1[e] */
        sgemm_rm(0, 0, n, F, D, 1.0f, xe + r0 * D, D, w1 + (long)e * D * F, F, 0.0f, h_b, F);
        /* h += b1[e]; a = act(h); ye = b2[e] (the second GEMM adds onto it) */
        for (int r = 0; r < n; r++) {
            float *hr = h_b + (long)r * F, *ar = a_b + (long)r * F;
            if (act == DAMEX_ACT_GELU_TANH) bias_gelu_tanh(hr, ar, b1_e, F);
            else if (act == DAMEX_ACT_GELU_ERF) bias_gelu_erf(hr, ar, b1_e, F);
            else bias_relu(hr, ar, b1_e, F);
            memcpy(y_b + (long)r * D, b2_e, (size_t)D * sizeof(float));
        }
        /* ye += a @ w2[e] */
        sgemm_rm(0, 0, n, D, F, 1.0f, a_b, F, w2 + (long)e * F * D, D, 1.0f, y_b, D);
    }
    if (par) blas_single_thread_end();
    free(blk);
    return DAMEX_OK;
}

/* inverts "h = xe @ w1[e] + b1[e]; a = act(h); ye = a @ w2[e] + b2[e]" */
int expert_ffn_backward(float *dxe, float *dw1, float *db1, float *dw2, float *db2, float *dh,
                        const float *dy, const float *xe, const float *h, const float *a,
                        const float *w1, const float *w2, const int64_t *expert_count, int E,
                        int D, int F, long N, int act)
{
    int status = check_ffn(expert_count, E, D, F, N, act);
    if (status != DAMEX_OK) return status;
    if (N == 0) { /* no rows: zero gradients */
        memset(dw1, 0, sizeof(float) * (size_t)E * D * F);
        memset(dw2, 0, sizeof(float) * (size_t)E * F * D);
        memset(db1, 0, sizeof(float) * (size_t)E * F);
        memset(db2, 0, sizeof(float) * (size_t)E * D);
        return DAMEX_OK;
    }
    row_block *blk;
    long nblk = row_blocks(&blk, expert_count, E);
    if (nblk < 0) return DAMEX_ENOMEM;
    long ncol = (F + BLOCK_COLS - 1) / BLOCK_COLS;
    long ntask = (long)E * 2 * ncol; /* (expert, dw1 or dw2, column block of F) */
    /* per-block column sums of dh (F) and dy (D), reduced in block order
     * afterwards so the bias gradients do not depend on scheduling */
    float *part = malloc((size_t)nblk * (F + D) * sizeof(float));
    long *row0 = malloc((size_t)E * sizeof(long));
    if (!part || !row0) {
        free(row0);
        free(blk);
        return DAMEX_ENOMEM;
    }
    long off = 0;
    for (int e = 0; e < E; e++) {
        row0[e] = off;
        off += (long)expert_count[e];
    }
    int par = (long)N * D * F >= PAR_MIN_FFN;
    if (par) blas_single_thread_begin();
#pragma omp parallel if (par)
    {
#pragma omp for schedule(dynamic, 1)
        for (long i = 0; i < nblk; i++) {
            int e = blk[i].e, n = blk[i].n;
            long r0 = blk[i].r0;
            float *g_b = dh + r0 * F, *p1 = part + i * (F + D), *p2 = p1 + F;
            const float *dy_b = dy + r0 * D, *h_b = h + r0 * F;
            /* da = dy @ w2[e]^T */
            sgemm_rm(0, 1, n, F, D, 1.0f, dy_b, D, w2 + (long)e * F * D, D, 0.0f, g_b, F);
            /* dh = da * act'(h); column sums of dh and dy */
            memset(p1, 0, (size_t)(F + D) * sizeof(float));
            for (int r = 0; r < n; r++) {
                float *gr = g_b + (long)r * F;
                const float *hr = h_b + (long)r * F;
                if (act == DAMEX_ACT_GELU_TANH) dgelu_tanh(gr, p1, hr, F);
                else if (act == DAMEX_ACT_GELU_ERF) dgelu_erf(gr, p1, hr, F);
                else drelu(gr, p1, hr, F);
                add_row(p2, dy_b + (long)r * D, D);
            }
            /* dxe = dh @ w1[e]^T */
            sgemm_rm(0, 1, n, D, F, 1.0f, g_b, F, w1 + (long)e * D * F, F, 0.0f, dxe + r0 * D, D);
        }
        /* (implicit barrier: dh is complete) */
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < ntask; t++) {
            int e = (int)(t / (2 * ncol)), kind = (int)(t / ncol % 2);
            int c0 = (int)(t % ncol) * BLOCK_COLS;
            int cw = F - c0 < BLOCK_COLS ? F - c0 : BLOCK_COLS;
            int n = (int)expert_count[e];
            long r0 = row0[e];
            if (kind == 0) { /* dw1[e][:, c0:c0+cw] = xe^T @ dh[:, c0:c0+cw] */
                float *d = dw1 + (long)e * D * F + c0;
                if (n == 0)
                    for (int i = 0; i < D; i++) memset(d + (long)i * F, 0, sizeof(float) * cw);
                else
                    sgemm_rm(1, 0, D, cw, n, 1.0f, xe + r0 * D, D, dh + r0 * F + c0, F, 0.0f, d, F);
            } else { /* dw2[e][c0:c0+cw, :] = a[:, c0:c0+cw]^T @ dy */
                float *d = dw2 + ((long)e * F + c0) * D;
                if (n == 0)
                    memset(d, 0, sizeof(float) * (size_t)cw * D);
                else
                    sgemm_rm(1, 0, cw, D, n, 1.0f, a + r0 * F + c0, F, dy + r0 * D, D, 0.0f, d, D);
            }
        }
    }
    if (par) blas_single_thread_end();
    memset(db1, 0, sizeof(float) * (size_t)E * F);
    memset(db2, 0, sizeof(float) * (size_t)E * D);
    for (long i = 0; i < nblk; i++) {
        add_row(db1 + (long)blk[i].e * F, part + i * (F + D), F);
        add_row(db2 + (long)blk[i].e * D, part + i * (F + D) + F, D);
    }
    free(part);
    free(row0);
    free(blk);
    return DAMEX_OK;
}
