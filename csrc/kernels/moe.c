/* Dispatch, expert FFN and combine (see moe.h for shapes and formulas).
 *
 * Threads: the expert GEMMs run one after another, each on exactly its
 * expert's rows, with OpenBLAS's own threads (no OpenMP around sgemm); the
 * gather/scatter and the fused bias+activation passes use OpenMP with a
 * static schedule over disjoint rows (tokens for combine, so no atomics).
 * Column sums (bias gradients) are per-thread partials reduced in thread
 * order, so results do not depend on scheduling. */
#include "moe.h"

#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "activation.h"
#include "blas.h"
#include "fastmath.h"
#include "status.h"

#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

/* Below this many floats of work a loop stays on one thread. */
#define PAR_MIN 32768L

static int max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

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

static int64_t *alloc_rows(int T, int k) { return malloc(((size_t)T * k + 1) * sizeof(int64_t)); }

/* ---- dispatch ------------------------------------------------------------- */

int dispatch_forward(float *xe, const float *x, const int64_t *expert_index, const int64_t *slot,
                     const int64_t *expert_count, int T, int k, int D, int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int64_t *rows = alloc_rows(T, k);
    if (!rows) return DAMEX_ENOMEM;
    int status = routing_rows(rows, expert_index, slot, expert_count, T, k, E, N);
    if (status == DAMEX_OK) {
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN)
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++) {
                int64_t r = rows[(long)t * k + j];
                if (r >= 0) memcpy(xe + r * D, x + (long)t * D, (size_t)D * sizeof(float));
            }
    }
    free(rows);
    return status;
}

/* inverts "xe[row(t,j)] = x[t]" */
int dispatch_backward(float *dx, const float *dxe, const int64_t *expert_index,
                      const int64_t *slot, const int64_t *expert_count, int T, int k, int D,
                      int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int64_t *rows = alloc_rows(T, k);
    if (!rows) return DAMEX_ENOMEM;
    int status = routing_rows(rows, expert_index, slot, expert_count, T, k, E, N);
    if (status == DAMEX_OK) {
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN)
        for (int t = 0; t < T; t++) {
            float *restrict d = dx + (long)t * D;
            for (int j = 0; j < k; j++) {
                int64_t r = rows[(long)t * k + j];
                if (r < 0) continue;
                const float *restrict g = dxe + r * D;
                for (int i = 0; i < D; i++) d[i] += g[i];
            }
        }
    }
    free(rows);
    return status;
}

/* ---- combine -------------------------------------------------------------- */

int combine_forward(float *y, const float *ye, const float *combine_weight,
                    const int64_t *expert_index, const int64_t *slot, const int64_t *expert_count,
                    int T, int k, int D, int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int64_t *rows = alloc_rows(T, k);
    if (!rows) return DAMEX_ENOMEM;
    int status = routing_rows(rows, expert_index, slot, expert_count, T, k, E, N);
    if (status == DAMEX_OK) {
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN)
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
    }
    free(rows);
    return status;
}

/* inverts "y[t] = sum_j w[t,j] * ye[row(t,j)]" */
int combine_backward(float *dye, float *dcombine_weight, const float *dy, const float *ye,
                     const float *combine_weight, const int64_t *expert_index,
                     const int64_t *slot, const int64_t *expert_count, int T, int k, int D,
                     int E, long N)
{
    if (D < 0) return DAMEX_EINVAL;
    int64_t *rows = alloc_rows(T, k);
    if (!rows) return DAMEX_ENOMEM;
    int status = routing_rows(rows, expert_index, slot, expert_count, T, k, E, N);
    if (status == DAMEX_OK) {
#pragma omp parallel for schedule(static) if ((long)T * D > PAR_MIN)
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
    }
    free(rows);
    return status;
}

/* ---- fused bias + activation, one row of F ------------------------------- */

/* h[i] += b[i]; a[i] = act(h[i]) */
DAMEX_CLONES
static void bias_gelu_tanh(float *restrict h, float *restrict a, const float *restrict b, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i] + b[i];
        h[i] = v; /* 0.5 (1 + tanh(u)) = sigmoid(2u) */
        a[i] = v / (1.0f + dx_expf(-2.0f * GELU_C * (v + GELU_A * v * v * v)));
    }
}

DAMEX_CLONES
static void bias_gelu_erf(float *restrict h, float *restrict a, const float *restrict b, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i] + b[i];
        h[i] = v;
        a[i] = 0.5f * v * (1.0f + dx_erff(v * INV_SQRT2));
    }
}

DAMEX_CLONES
static void bias_relu(float *restrict h, float *restrict a, const float *restrict b, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i] + b[i];
        h[i] = v;
        a[i] = v > 0.0f ? v : 0.0f;
    }
}

/* inverts "a = act(h)" in place: g[i] = g[i] * act'(h[i]); db[i] += g[i] */
DAMEX_CLONES
static void dgelu_tanh(float *restrict g, float *restrict db, const float *restrict h, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i];
        /* s = 0.5 (1 + tanh(u)) = sigmoid(2u);  0.5 (1 - tanh^2 u) = 2 s (1 - s) */
        float s = 1.0f / (1.0f + dx_expf(-2.0f * GELU_C * (v + GELU_A * v * v * v)));
        float d = s + 2.0f * v * s * (1.0f - s) * GELU_C * (1.0f + 3.0f * GELU_A * v * v);
        float r = g[i] * d;
        g[i] = r;
        db[i] += r;
    }
}

DAMEX_CLONES
static void dgelu_erf(float *restrict g, float *restrict db, const float *restrict h, int F)
{
    for (int i = 0; i < F; i++) {
        float v = h[i];
        float d = 0.5f * (1.0f + dx_erff(v * INV_SQRT2)) + v * INV_SQRT_2PI * dx_expf(-0.5f * v * v);
        float r = g[i] * d;
        g[i] = r;
        db[i] += r;
    }
}

DAMEX_CLONES
static void drelu(float *restrict g, float *restrict db, const float *restrict h, int F)
{
    for (int i = 0; i < F; i++) {
        float r = h[i] > 0.0f ? g[i] : 0.0f;
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

int expert_ffn_forward(float *ye, float *h, float *a, const float *xe, const float *w1,
                       const float *b1, const float *w2, const float *b2,
                       const int64_t *expert_count, int E, int D, int F, long N, int act)
{
    int status = check_ffn(expert_count, E, D, F, N, act);
    if (status != DAMEX_OK) return status;
    long off = 0;
    for (int e = 0; e < E; e++) {
        int n = (int)expert_count[e];
        if (n == 0) continue;
        const float *x_e = xe + off * D;
        float *h_e = h + off * F, *a_e = a + off * F, *y_e = ye + off * D;
        const float *b1_e = b1 + (long)e * F, *b2_e = b2 + (long)e * D;
        /* h = xe @ w1[e] */
        sgemm_rm(0, 0, n, F, D, 1.0f, x_e, D, w1 + (long)e * D * F, F, 0.0f, h_e, F);
        /* h += b1[e]; a = act(h); ye = b2[e] (the second GEMM adds onto it) */
#pragma omp parallel for schedule(static) if ((long)n * F > PAR_MIN)
        for (int r = 0; r < n; r++) {
            float *hr = h_e + (long)r * F, *ar = a_e + (long)r * F;
            if (act == DAMEX_ACT_GELU_TANH) bias_gelu_tanh(hr, ar, b1_e, F);
            else if (act == DAMEX_ACT_GELU_ERF) bias_gelu_erf(hr, ar, b1_e, F);
            else bias_relu(hr, ar, b1_e, F);
            memcpy(y_e + (long)r * D, b2_e, (size_t)D * sizeof(float));
        }
        /* ye += a @ w2[e] */
        sgemm_rm(0, 0, n, D, F, 1.0f, a_e, F, w2 + (long)e * F * D, D, 1.0f, y_e, D);
        off += n;
    }
    return DAMEX_OK;
}

/* inverts "h = xe @ w1[e] + b1[e]; a = act(h); ye = a @ w2[e] + b2[e]" */
int expert_ffn_backward(float *dxe, float *dw1, float *db1, float *dw2, float *db2,
                        const float *dye, const float *xe, const float *h, const float *a,
                        const float *w1, const float *w2, const int64_t *expert_count, int E,
                        int D, int F, long N, int act)
{
    int status = check_ffn(expert_count, E, D, F, N, act);
    if (status != DAMEX_OK) return status;
    long max_n = 0;
    for (int e = 0; e < E; e++)
        if (expert_count[e] > max_n) max_n = (long)expert_count[e];
    if (max_n == 0) return DAMEX_OK;
    int nt = max_threads();
    /* dh for one expert at a time (stays warm in cache between its GEMMs),
     * and per-thread partial column sums for db1 (F) and db2 (D). */
    float *dh = malloc((size_t)max_n * F * sizeof(float));
    float *part = malloc((size_t)nt * (F + D) * sizeof(float));
    if (!dh || !part) {
        free(dh);
        free(part);
        return DAMEX_ENOMEM;
    }
    long off = 0;
    for (int e = 0; e < E; e++) {
        int n = (int)expert_count[e];
        if (n == 0) continue;
        const float *x_e = xe + off * D, *h_e = h + off * F, *a_e = a + off * F;
        const float *g_e = dye + off * D;
        const float *w1_e = w1 + (long)e * D * F, *w2_e = w2 + (long)e * F * D;
        /* dw2[e] += a^T @ dye */
        sgemm_rm(1, 0, F, D, n, 1.0f, a_e, F, g_e, D, 1.0f, dw2 + (long)e * F * D, D);
        /* da = dye @ w2[e]^T */
        sgemm_rm(0, 1, n, F, D, 1.0f, g_e, D, w2_e, D, 0.0f, dh, F);
        /* dh = da * act'(h), db1 partials; db2 partials = row sums of dye */
        memset(part, 0, (size_t)nt * (F + D) * sizeof(float));
#pragma omp parallel if ((long)n * F > PAR_MIN)
        {
            float *p1 = part + (long)thread_id() * (F + D), *p2 = p1 + F;
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                float *gr = dh + (long)r * F;
                const float *hr = h_e + (long)r * F;
                if (act == DAMEX_ACT_GELU_TANH) dgelu_tanh(gr, p1, hr, F);
                else if (act == DAMEX_ACT_GELU_ERF) dgelu_erf(gr, p1, hr, F);
                else drelu(gr, p1, hr, F);
                add_row(p2, g_e + (long)r * D, D);
            }
        }
        for (int i = 0; i < nt; i++) {
            add_row(db1 + (long)e * F, part + (long)i * (F + D), F);
            add_row(db2 + (long)e * D, part + (long)i * (F + D) + F, D);
        }
        /* dw1[e] += xe^T @ dh */
        sgemm_rm(1, 0, D, F, n, 1.0f, x_e, D, dh, F, 1.0f, dw1 + (long)e * D * F, F);
        /* dxe += dh @ w1[e]^T */
        sgemm_rm(0, 1, n, D, F, 1.0f, dh, F, w1_e, F, 1.0f, dxe + off * D, D);
        off += n;
    }
    free(dh);
    free(part);
    return DAMEX_OK;
}
