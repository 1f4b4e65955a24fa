/* Multi-scale deformable attention, forward and backward (see msda.h for shapes).
 *
 *   out[n,q,m,:] = sum_{l,p} a * sum_c w_c(x, y) value[n, start_l + y_c W_l + x_c, m, :]
 *   a = attw[n,q,m,l,p],  x = loc_x W_l - 0.5,  y = loc_y H_l - 0.5,
 *   corners c = (y0,x0) (y0,x1) (y1,x0) (y1,x1), x0 = floor(x), fx = x - x0,
 *   w = (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy;  a corner off the map reads 0.
 *
 * Work is split over (n, m): the task (n, m) reads value[n,:,m,:] and writes
 * out[n,:,m,:], dvalue[n,:,m,:], dloc[n,:,m,...], dattw[n,:,m,...],
 * so threads never write the same element and the backward needs no atomics.
 * Each task first copies its value[n,:,m,:] into a contiguous [S,D] buffer
 * (and scatters into a private [S,D] gradient buffer), so corner reads are
 * contiguous D-vectors; the buffer has 4 extra rows: zeros to read and a sink
 * to write for corners off the map, which keeps the inner loops branch-free. */
#include "msda.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"
#include "parallel.h"
#include "cpu.h"

/* GNU vector extension: 8 floats, one AVX register (two SSE registers in the
 * default clone), for the dot products of the backward. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

/* unaligned load of 8 floats (a macro: a function returning v8f would change the ABI
 * of the non-AVX clone) */
#define LOAD8(x, p) memcpy(&(x), (p), sizeof(v8f))

int ms_deform_attn_check_levels(const int64_t *spatial_shapes, const int64_t *level_start, int L,
                                long S)
{
    int64_t total = 0;
    for (int l = 0; l < L; l++) {
        int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
        if (H < 1 || W < 1 || H > 2147483647 || W > 2147483647) return DAMEX_EINVAL;
        if (level_start[l] != total) return DAMEX_EINVAL;
        total += H * W;
        if (total > S) return DAMEX_EINVAL;
    }
    return total == S ? DAMEX_OK : DAMEX_EINVAL;
}

/* Per-task scratch: the value buffer, the gradient buffer (backward only) and the
 * corners of the L*P samples of one query, set up together in a branch-free loop. */
typedef struct {
    float *vb, *gvb;                /* [S+4, D] each */
    float *wf, *hf;                 /* [LP] level width / height of sample i (as floats) */
    int *wi, *hi, *start;           /* [LP] the same as ints, and the level's first row */
    int *row;                       /* [4, LP] corner rows in vb (S+c for a corner off the map) */
    float *fx, *fy;                 /* [LP] fractional position inside the pixel cell */
} scratch_t;

static void scratch_levels(scratch_t *t, const int64_t *shapes, const int64_t *starts, int L, int P)
{
    for (int l = 0; l < L; l++)
        for (int p = 0; p < P; p++) {
            int i = l * P + p;
            t->hi[i] = (int)shapes[2 * l];
            t->wi[i] = (int)shapes[2 * l + 1];
            t->hf[i] = (float)t->hi[i];
            t->wf[i] = (float)t->wi[i];
            t->start[i] = (int)starts[l];
        }
}

/* Corners of the LP samples of one query at loc lq[LP, 2].  x = loc_x W - 0.5 is first
 * clamped to [-2, W + 1] (NaN goes to -2): that changes no point with a corner on the
 * map, keeps floor() in int range, and a point with no corner on the map then has four
 * off-map corners, reading zeros (so value 0 and location gradient 0, as grid_sample)
 * and writing its value gradient to the sink rows. */
static inline __attribute__((always_inline)) void setup_corners(scratch_t *t, const float *lq,
                                                                int LP, int S)
{
    /* restrict locals and no short-circuit operators: a straight-line body (GCC still
     * keeps it scalar: float -> int conversion may trap under -ftrapping-math) */
    int *restrict r0 = t->row, *restrict r1 = r0 + LP, *restrict r2 = r1 + LP;
    int *restrict r3 = r2 + LP;
    float *restrict fxo = t->fx, *restrict fyo = t->fy;
    const float *restrict wf = t->wf, *restrict hf = t->hf, *restrict lqr = lq;
    const int *restrict wi = t->wi, *restrict hi = t->hi, *restrict st = t->start;
    for (int i = 0; i < LP; i++) {
        float W = wf[i], H = hf[i];
        float x = lqr[2 * i] * W - 0.5f, y = lqr[2 * i + 1] * H - 0.5f;
        x = x > -2.0f ? x : -2.0f; /* false for NaN: NaN -> -2 */
        y = y > -2.0f ? y : -2.0f;
        x = x < W + 1.0f ? x : W + 1.0f;
        y = y < H + 1.0f ? y : H + 1.0f;
        float x0f = floorf(x), y0f = floorf(y);
        fxo[i] = x - x0f;
        fyo[i] = y - y0f;
        int x0 = (int)x0f, y0 = (int)y0f, w = wi[i], h = hi[i];
        int in_x0 = (x0 >= 0) & (x0 < w), in_x1 = (x0 >= -1) & (x0 < w - 1);
        int in_y0 = (y0 >= 0) & (y0 < h), in_y1 = (y0 >= -1) & (y0 < h - 1);
        int base = st[i] + y0 * w + x0;
        r0[i] = (in_y0 & in_x0) ? base : S + 0;
        r1[i] = (in_y0 & in_x1) ? base + 1 : S + 1;
        r2[i] = (in_y1 & in_x0) ? base + w : S + 2;
        r3[i] = (in_y1 & in_x1) ? base + w + 1 : S + 3;
    }
}

/* Prefetch `bytes` bytes from p: the per-query rows of one head sit M rows apart,
 * a stride the hardware prefetcher does not follow far enough ahead. */
static inline void prefetch_row(const void *p, long bytes, int write)
{
    for (long b = 0; b < bytes; b += 64) {
        if (write)
            __builtin_prefetch((const char *)p + b, 1, 3);
        else
            __builtin_prefetch((const char *)p + b, 0, 3);
    }
}

#define PREFETCH_AHEAD 2

/* vb[s,:] = value[n,s,m,:] for s < S; rows S..S+3 = 0 */
static void gather_head(float *vb, const float *value, int n, int m, int S, int M, int D)
{
    for (long s = 0; s < S; s++)
        memcpy(vb + s * D, value + (((long)n * S + s) * M + m) * D, sizeof(float) * D);
    memset(vb + (long)S * D, 0, sizeof(float) * 4 * D);
}

/* One (n, m) task of the forward; D_ is a compile-time constant where inlined. */
static inline __attribute__((always_inline)) void
fwd_head(float *out, scratch_t *t, const float *value, const float *loc, const float *attw, int n,
         int m, int S, int M, int D_, int Lq, int LP)
{
    const long D = D_;
    float *vb = t->vb;
    gather_head(vb, value, n, m, S, M, D_);
    const int *r0 = t->row, *r1 = r0 + LP, *r2 = r1 + LP, *r3 = r2 + LP;
    for (long q = 0; q < Lq; q++) {
        long nqm = ((long)n * Lq + q) * M + m;
        float *restrict o = out + nqm * D;
        if (q + PREFETCH_AHEAD < Lq) {
            long ahead = nqm + (long)PREFETCH_AHEAD * M;
            prefetch_row(loc + ahead * LP * 2, sizeof(float) * LP * 2, 0);
            prefetch_row(attw + ahead * LP, sizeof(float) * LP, 0);
            prefetch_row(out + ahead * D, sizeof(float) * D, 1);
        }
        const float *aq = attw + nqm * LP;
        setup_corners(t, loc + nqm * LP * 2, LP, S);
        for (long d = 0; d < D; d++) o[d] = 0.0f;
        for (int i = 0; i < LP; i++) {
            float a = aq[i], fx = t->fx[i], fy = t->fy[i];
            float w0 = a * (1.0f - fx) * (1.0f - fy), w1 = a * fx * (1.0f - fy);
            float w2 = a * (1.0f - fx) * fy, w3 = a * fx * fy;
            const float *restrict v0 = vb + r0[i] * D, *restrict v1 = vb + r1[i] * D;
            const float *restrict v2 = vb + r2[i] * D, *restrict v3 = vb + r3[i] * D;
            for (long d = 0; d < D; d++) o[d] += (w0 * v0[d] + w1 * v1[d]) + (w2 * v2[d] + w3 * v3[d]);
        }
    }
}

DAMEX_CLONES
static void fwd_head_any(float *out, scratch_t *t, const float *value, const float *loc,
                         const float *attw, int n, int m, int S, int M, int D, int Lq, int LP)
{
    if (D == 32)
        fwd_head(out, t, value, loc, attw, n, m, S, M, 32, Lq, LP);
    else if (D == 64)
        fwd_head(out, t, value, loc, attw, n, m, S, M, 64, Lq, LP);
    else
        fwd_head(out, t, value, loc, attw, n, m, S, M, D, Lq, LP);
}

/* *d_c = g . v_c for four rows at once.  Strict IEEE order would make each sum a
 * serial chain of scalar adds, so the products are summed in 8 lanes (GNU vector
 * extension, one register per row) and the four lane vectors are then reduced
 * together by a shuffle tree that never leaves the registers.  The order is fixed,
 * so results do not depend on threads. */

static inline __attribute__((always_inline)) void
dot4(float *d0, float *d1, float *d2, float *d3, const float *restrict g,
     const float *restrict v0, const float *restrict v1, const float *restrict v2,
     const float *restrict v3, long D)
{
    v8f a = {0}, b = {0}, c = {0}, e = {0};
    long d = 0;
    for (; d + 8 <= D; d += 8) {
        v8f gv, w0, w1, w2, w3;
        LOAD8(gv, g + d);
        LOAD8(w0, v0 + d);
        LOAD8(w1, v1 + d);
        LOAD8(w2, v2 + d);
        LOAD8(w3, v3 + d);
        a += gv * w0;
        b += gv * w1;
        c += gv * w2;
        e += gv * w3;
    }
    /* x0 = [a_i + a_i+4 | b_i + b_i+4], x1 likewise for c, e */
    v8f x0 = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    v8f x1 = __builtin_shufflevector(c, e, 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(c, e, 4, 5, 6, 7, 12, 13, 14, 15);
    v8f y = __builtin_shufflevector(x0, x1, 0, 1, 8, 9, 4, 5, 12, 13) +
            __builtin_shufflevector(x0, x1, 2, 3, 10, 11, 6, 7, 14, 15);
    v4f z = __builtin_shufflevector(y, y, 0, 2, 4, 6) + __builtin_shufflevector(y, y, 1, 3, 5, 7);
    /* z = [sum a, sum c, sum b, sum e] */
    float s0 = z[0], s1 = z[2], s2 = z[1], s3 = z[3];
    for (; d < D; d++) {
        s0 += g[d] * v0[d];
        s1 += g[d] * v1[d];
        s2 += g[d] * v2[d];
        s3 += g[d] * v3[d];
    }
    *d0 = s0;
    *d1 = s1;
    *d2 = s2;
    *d3 = s3;
}

/* One (n, m) task of the backward, inverting the forward line
 *   o[d] += w0 v0[d] + w1 v1[d] + w2 v2[d] + w3 v3[d],  w_c = a * bilinear_c(fx, fy):
 *   dot_c = g . v_c
 *   dattw += sum_c bilinear_c dot_c
 *   grad_x    += a W ((1-fy)(dot_1 - dot_0) + fy (dot_3 - dot_2))
 *   grad_y    += a H ((1-fx)(dot_2 - dot_0) + fx (dot_3 - dot_1))
 *   gvb[c]    += w_c g                                                        */
static inline __attribute__((always_inline)) void
bwd_head(float *dvalue, float *dloc, float *dattw, scratch_t *t,
         const float *dy, const float *value, const float *loc, const float *attw, int n,
         int m, int S, int M, int D_, int Lq, int LP)
{
    const long D = D_;
    float *vb = t->vb, *gvb = t->gvb;
    gather_head(vb, value, n, m, S, M, D_);
    memset(gvb, 0, sizeof(float) * ((long)S + 4) * D);
    const int *r0 = t->row, *r1 = r0 + LP, *r2 = r1 + LP, *r3 = r2 + LP;
    for (long q = 0; q < Lq; q++) {
        long nqm = ((long)n * Lq + q) * M + m;
        const float *restrict g = dy + nqm * D;
        const float *aq = attw + nqm * LP;
        float *ga = dattw + nqm * LP;
        float *gl = dloc + nqm * LP * 2;
        if (q + PREFETCH_AHEAD < Lq) {
            long ahead = nqm + (long)PREFETCH_AHEAD * M;
            prefetch_row(loc + ahead * LP * 2, sizeof(float) * LP * 2, 0);
            prefetch_row(attw + ahead * LP, sizeof(float) * LP, 0);
            prefetch_row(dy + ahead * D, sizeof(float) * D, 0);
            prefetch_row(dloc + ahead * LP * 2, sizeof(float) * LP * 2, 1);
            prefetch_row(dattw + ahead * LP, sizeof(float) * LP, 1);
        }
        setup_corners(t, loc + nqm * LP * 2, LP, S);
        for (int i = 0; i < LP; i++) {
            float a = aq[i], fx = t->fx[i], fy = t->fy[i];
            const float *restrict v0 = vb + r0[i] * D, *restrict v1 = vb + r1[i] * D;
            const float *restrict v2 = vb + r2[i] * D, *restrict v3 = vb + r3[i] * D;
            float d0, d1, d2, d3;
            dot4(&d0, &d1, &d2, &d3, g, v0, v1, v2, v3, D);
            float b0 = (1.0f - fx) * (1.0f - fy), b1 = fx * (1.0f - fy);
            float b2 = (1.0f - fx) * fy, b3 = fx * fy;
            ga[i] += b0 * d0 + b1 * d1 + b2 * d2 + b3 * d3;
            gl[2 * i] += a * t->wf[i] * ((1.0f - fy) * (d1 - d0) + fy * (d3 - d2));
            gl[2 * i + 1] += a * t->hf[i] * ((1.0f - fx) * (d2 - d0) + fx * (d3 - d1));
            float w0 = a * b0, w1 = a * b1, w2 = a * b2, w3 = a * b3;
            float *restrict u0 = gvb + r0[i] * D, *restrict u1 = gvb + r1[i] * D;
            float *restrict u2 = gvb + r2[i] * D, *restrict u3 = gvb + r3[i] * D;
            for (long d = 0; d < D; d++) {
                u0[d] += w0 * g[d];
                u1[d] += w1 * g[d];
                u2[d] += w2 * g[d];
                u3[d] += w3 * g[d];
            }
        }
    }
    for (long s = 0; s < S; s++) {
        float *restrict dst = dvalue + (((long)n * S + s) * M + m) * D;
        const float *restrict src = gvb + s * D;
        for (long d = 0; d < D; d++) dst[d] += src[d];
    }
}

DAMEX_CLONES
static void bwd_head_any(float *dvalue, float *dloc, float *dattw, scratch_t *t,
                         const float *dy, const float *value, const float *loc,
                         const float *attw, int n, int m, int S, int M, int D, int Lq, int LP)
{
    if (D == 32)
        bwd_head(dvalue, dloc, dattw, t, dy, value, loc, attw, n, m, S, M, 32,
                 Lq, LP);
    else if (D == 64)
        bwd_head(dvalue, dloc, dattw, t, dy, value, loc, attw, n, m, S, M, 64,
                 Lq, LP);
    else
        bwd_head(dvalue, dloc, dattw, t, dy, value, loc, attw, n, m, S, M, D,
                 Lq, LP);
}

/* One allocation per thread: [S+4, D] value buffer (and gradient buffer if `grad`), and
 * the per-sample tables.  Returns NULL when out of memory. */
static void *scratch_alloc(scratch_t *t, int S, int D, int LP, int grad, const int64_t *shapes,
                           const int64_t *starts, int L, int P)
{
    size_t rows = ((size_t)S + 4) * (size_t)(D > 0 ? D : 1);
    size_t lp = (size_t)(LP > 0 ? LP : 1);
    size_t floats = rows * (grad ? 2 : 1) + 4 * lp;  /* vb, gvb, wf, hf, fx, fy */
    size_t ints = 7 * lp;                            /* wi, hi, start, row[4] */
    char *mem = malloc(sizeof(float) * floats + sizeof(int) * ints);
    if (!mem) return NULL;
    float *f = (float *)mem;
    t->vb = f;
    f += rows;
    t->gvb = grad ? f : NULL;
    f += grad ? rows : 0;
    t->wf = f;
    t->hf = f + lp;
    t->fx = f + 2 * lp;
    t->fy = f + 3 * lp;
    int *i = (int *)(f + 4 * lp);
    t->wi = i;
    t->hi = i + lp;
    t->start = i + 2 * lp;
    t->row = i + 3 * lp;
    scratch_levels(t, shapes, starts, L, P);
    return mem;
}

/* Threads only pay for themselves above ~0.1 ms of work (parallel.h). */
static int parallel_worth_it(int N, int M, int D, int Lq, int LP)
{
    return (double)N * M * Lq * LP * (D + 16) > PAR_MIN_MSDA;
}

static int check_sizes(const int64_t *shapes, const int64_t *starts, int N, int S, int M, int D,
                       int Lq, int L, int P)
{
    if (N < 0 || S < 0 || M < 0 || D < 0 || Lq < 0 || L < 0 || P < 0) return DAMEX_EINVAL;
    /* int corner rows: start + (y0 + 1) W + x0 + 1 <= 2 S + 4 must fit */
    if (S > (INT_MAX - 8) / 2 || (long)L * P > INT_MAX / 8) return DAMEX_EINVAL;
    return ms_deform_attn_check_levels(shapes, starts, L, S);
}

int ms_deform_attn_forward(float *out, const float *value, const int64_t *spatial_shapes,
                           const int64_t *level_start, const float *loc, const float *attw, int N,
                           int S, int M, int D, int Lq, int L, int P)
{
    int st = check_sizes(spatial_shapes, level_start, N, S, M, D, Lq, L, P);
    if (st != DAMEX_OK) return st;
    long tasks = (long)N * M;
    int failed = 0;
#pragma omp parallel if (tasks > 1 && parallel_worth_it(N, M, D, Lq, L * P))
    {
        scratch_t t;
        void *mem = scratch_alloc(&t, S, D, L * P, 0, spatial_shapes, level_start, L, P);
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (long k = 0; k < tasks; k++)
            if (mem)
                fwd_head_any(out, &t, value, loc, attw, (int)(k / M), (int)(k % M), S, M, D, Lq,
                             L * P);
        free(mem);
    }
    return failed ? DAMEX_ENOMEM : DAMEX_OK;
}

int ms_deform_attn_backward(float *dvalue, float *dloc, float *dattw,
                            const float *dy, const float *value,
                            const int64_t *spatial_shapes, const int64_t *level_start,
                            const float *loc, const float *attw, int N, int S, int M, int D,
                            int Lq, int L, int P)
{
    int st = check_sizes(spatial_shapes, level_start, N, S, M, D, Lq, L, P);
    if (st != DAMEX_OK) return st;
    long tasks = (long)N * M;
    int failed = 0;
#pragma omp parallel if (tasks > 1 && parallel_worth_it(N, M, D, Lq, L * P))
    {
        scratch_t t;
        void *mem = scratch_alloc(&t, S, D, L * P, 1, spatial_shapes, level_start, L, P);
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (long k = 0; k < tasks; k++)
            if (mem)
                bwd_head_any(dvalue, dloc, dattw, &t, dy, value, loc, attw,
                             (int)(k / M), (int)(k % M), S, M, D, Lq, L * P);
        free(mem);
    }
    return failed ? DAMEX_ENOMEM : DAMEX_OK;
}
