/* Multi-scale deformable attention, forward and backward (see msda.h for shapes).
 *
 *   out[n,q,m,:] = sum_{l,p} a * sum_c w_c(x, y) value[n, start_l + y_c W_l + x_c, m, :]
 *   a = attw[n,q,m,l,p],  x = loc_x W_l - 0.5,  y = loc_y H_l - 0.5,
 *   corners c = (y0,x0) (y0,x1) (y1,x0) (y1,x1), x0 = floor(x), fx = x - x0,
 *   w = (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy;  a corner off the map reads 0.
 *
 * Work is split over (n, m): the task (n, m) reads value[n,:,m,:] and writes
 * out[n,:,m,:], grad_value[n,:,m,:], grad_loc[n,:,m,...], grad_attw[n,:,m,...],
 * so threads never write the same element and the backward needs no atomics.
 * Each task first copies its value[n,:,m,:] into a contiguous [S,D] buffer
 * (and scatters into a private [S,D] gradient buffer), so corner reads are
 * contiguous D-vectors; the buffer has 4 extra rows: zeros to read and a sink
 * to write for corners off the map, which keeps the inner loops branch-free. */
#include "msda.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"
#include "status.h"

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

/* The four corner rows of one sample (into the [S+4, D] per-task buffer) and the
 * fractional position.  Returns 0 when no corner lies on the map (also for NaN),
 * exactly the points where grid_sample gives 0 and a zero gradient. */
typedef struct {
    long row[4];
    float fx, fy;
} corners_t;

static inline int bilinear_corners(corners_t *c, float lx, float ly, int H, int W, long start,
                                   long S)
{
    float x = lx * (float)W - 0.5f, y = ly * (float)H - 0.5f;
    if (!(x >= -1.0f && x < (float)W && y >= -1.0f && y < (float)H)) return 0;
    int x0 = (int)floorf(x), y0 = (int)floorf(y);
    c->fx = x - (float)x0;
    c->fy = y - (float)y0;
    int x1 = x0 + 1, y1 = y0 + 1;
    int in_x0 = x0 >= 0, in_x1 = x1 < W, in_y0 = y0 >= 0, in_y1 = y1 < H;
    c->row[0] = in_y0 && in_x0 ? start + (long)y0 * W + x0 : S + 0;
    c->row[1] = in_y0 && in_x1 ? start + (long)y0 * W + x1 : S + 1;
    c->row[2] = in_y1 && in_x0 ? start + (long)y1 * W + x0 : S + 2;
    c->row[3] = in_y1 && in_x1 ? start + (long)y1 * W + x1 : S + 3;
    return 1;
}

/* vb[s,:] = value[n,s,m,:] for s < S; rows S..S+3 = 0 */
static void gather_head(float *vb, const float *value, int n, int m, int S, int M, int D)
{
    for (long s = 0; s < S; s++)
        memcpy(vb + s * D, value + (((long)n * S + s) * M + m) * D, sizeof(float) * D);
    memset(vb + (long)S * D, 0, sizeof(float) * 4 * D);
}

/* One (n, m) task of the forward; D_ is a compile-time constant where inlined. */
static inline __attribute__((always_inline)) void
fwd_head(float *out, float *vb, const float *value, const int64_t *shapes, const int64_t *starts,
         const float *loc, const float *attw, int n, int m, int S, int M, int D_, int Lq, int L,
         int P)
{
    const long D = D_;
    gather_head(vb, value, n, m, S, M, D_);
    for (long q = 0; q < Lq; q++) {
        long nqm = ((long)n * Lq + q) * M + m;
        float *restrict o = out + nqm * D;
        for (long d = 0; d < D; d++) o[d] = 0.0f;
        const float *aq = attw + nqm * L * P;
        const float *lq = loc + nqm * L * P * 2;
        for (int l = 0; l < L; l++) {
            int H = (int)shapes[2 * l], W = (int)shapes[2 * l + 1];
            long start = (long)starts[l];
            for (int p = 0; p < P; p++) {
                long i = (long)l * P + p;
                corners_t c;
                if (!bilinear_corners(&c, lq[2 * i], lq[2 * i + 1], H, W, start, S)) continue;
                float a = aq[i], fx = c.fx, fy = c.fy;
                float w0 = a * (1.0f - fx) * (1.0f - fy), w1 = a * fx * (1.0f - fy);
                float w2 = a * (1.0f - fx) * fy, w3 = a * fx * fy;
                const float *restrict v0 = vb + c.row[0] * D, *restrict v1 = vb + c.row[1] * D;
                const float *restrict v2 = vb + c.row[2] * D, *restrict v3 = vb + c.row[3] * D;
                for (long d = 0; d < D; d++) o[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
            }
        }
    }
}

DAMEX_CLONES
static void fwd_head_any(float *out, float *vb, const float *value, const int64_t *shapes,
                         const int64_t *starts, const float *loc, const float *attw, int n, int m,
                         int S, int M, int D, int Lq, int L, int P)
{
    if (D == 32)
        fwd_head(out, vb, value, shapes, starts, loc, attw, n, m, S, M, 32, Lq, L, P);
    else if (D == 64)
        fwd_head(out, vb, value, shapes, starts, loc, attw, n, m, S, M, 64, Lq, L, P);
    else
        fwd_head(out, vb, value, shapes, starts, loc, attw, n, m, S, M, D, Lq, L, P);
}

/* One (n, m) task of the backward, inverting the forward line
 *   o[d] += w0 v0[d] + w1 v1[d] + w2 v2[d] + w3 v3[d],  w_c = a * bilinear_c(fx, fy):
 *   dot_c = g . v_c
 *   grad_attw += sum_c bilinear_c dot_c
 *   grad_x    += a W ((1-fy)(dot_1 - dot_0) + fy (dot_3 - dot_2))
 *   grad_y    += a H ((1-fx)(dot_2 - dot_0) + fx (dot_3 - dot_1))
 *   gvb[c]    += w_c g                                                        */
static inline __attribute__((always_inline)) void
bwd_head(float *grad_value, float *grad_loc, float *grad_attw, float *vb, float *gvb,
         const float *grad_out, const float *value, const int64_t *shapes, const int64_t *starts,
         const float *loc, const float *attw, int n, int m, int S, int M, int D_, int Lq, int L,
         int P)
{
    const long D = D_;
    gather_head(vb, value, n, m, S, M, D_);
    memset(gvb, 0, sizeof(float) * ((long)S + 4) * D);
    for (long q = 0; q < Lq; q++) {
        long nqm = ((long)n * Lq + q) * M + m;
        const float *restrict g = grad_out + nqm * D;
        const float *aq = attw + nqm * L * P;
        const float *lq = loc + nqm * L * P * 2;
        float *ga = grad_attw + nqm * L * P;
        float *gl = grad_loc + nqm * L * P * 2;
        for (int l = 0; l < L; l++) {
            int H = (int)shapes[2 * l], W = (int)shapes[2 * l + 1];
            long start = (long)starts[l];
            for (int p = 0; p < P; p++) {
                long i = (long)l * P + p;
                corners_t c;
                if (!bilinear_corners(&c, lq[2 * i], lq[2 * i + 1], H, W, start, S)) continue;
                float a = aq[i], fx = c.fx, fy = c.fy;
                const float *restrict v0 = vb + c.row[0] * D, *restrict v1 = vb + c.row[1] * D;
                const float *restrict v2 = vb + c.row[2] * D, *restrict v3 = vb + c.row[3] * D;
                float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
                for (long d = 0; d < D; d++) {
                    d0 += g[d] * v0[d];
                    d1 += g[d] * v1[d];
                    d2 += g[d] * v2[d];
                    d3 += g[d] * v3[d];
                }
                float b0 = (1.0f - fx) * (1.0f - fy), b1 = fx * (1.0f - fy);
                float b2 = (1.0f - fx) * fy, b3 = fx * fy;
                ga[i] += b0 * d0 + b1 * d1 + b2 * d2 + b3 * d3;
                gl[2 * i] += a * (float)W * ((1.0f - fy) * (d1 - d0) + fy * (d3 - d2));
                gl[2 * i + 1] += a * (float)H * ((1.0f - fx) * (d2 - d0) + fx * (d3 - d1));
                float w0 = a * b0, w1 = a * b1, w2 = a * b2, w3 = a * b3;
                float *restrict u0 = gvb + c.row[0] * D, *restrict u1 = gvb + c.row[1] * D;
                float *restrict u2 = gvb + c.row[2] * D, *restrict u3 = gvb + c.row[3] * D;
                for (long d = 0; d < D; d++) {
                    u0[d] += w0 * g[d];
                    u1[d] += w1 * g[d];
                    u2[d] += w2 * g[d];
                    u3[d] += w3 * g[d];
                }
            }
        }
    }
    for (long s = 0; s < S; s++) {
        float *restrict dst = grad_value + (((long)n * S + s) * M + m) * D;
        const float *restrict src = gvb + s * D;
        for (long d = 0; d < D; d++) dst[d] += src[d];
    }
}

DAMEX_CLONES
static void bwd_head_any(float *grad_value, float *grad_loc, float *grad_attw, float *vb,
                         float *gvb, const float *grad_out, const float *value,
                         const int64_t *shapes, const int64_t *starts, const float *loc,
                         const float *attw, int n, int m, int S, int M, int D, int Lq, int L, int P)
{
    if (D == 32)
        bwd_head(grad_value, grad_loc, grad_attw, vb, gvb, grad_out, value, shapes, starts, loc,
                 attw, n, m, S, M, 32, Lq, L, P);
    else if (D == 64)
        bwd_head(grad_value, grad_loc, grad_attw, vb, gvb, grad_out, value, shapes, starts, loc,
                 attw, n, m, S, M, 64, Lq, L, P);
    else
        bwd_head(grad_value, grad_loc, grad_attw, vb, gvb, grad_out, value, shapes, starts, loc,
                 attw, n, m, S, M, D, Lq, L, P);
}

static int check_sizes(const int64_t *shapes, const int64_t *starts, int N, int S, int M, int D,
                       int Lq, int L, int P)
{
    if (N < 0 || S < 0 || M < 0 || D < 0 || Lq < 0 || L < 0 || P < 0) return DAMEX_EINVAL;
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
#pragma omp parallel if (tasks > 1)
    {
        float *vb = malloc(sizeof(float) * ((size_t)S + 4) * (D > 0 ? D : 1));
        if (!vb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < tasks; t++)
            if (vb)
                fwd_head_any(out, vb, value, spatial_shapes, level_start, loc, attw, (int)(t / M),
                             (int)(t % M), S, M, D, Lq, L, P);
        free(vb);
    }
    return failed ? DAMEX_ENOMEM : DAMEX_OK;
}

int ms_deform_attn_backward(float *grad_value, float *grad_loc, float *grad_attw,
                            const float *grad_out, const float *value,
                            const int64_t *spatial_shapes, const int64_t *level_start,
                            const float *loc, const float *attw, int N, int S, int M, int D,
                            int Lq, int L, int P)
{
    int st = check_sizes(spatial_shapes, level_start, N, S, M, D, Lq, L, P);
    if (st != DAMEX_OK) return st;
    long tasks = (long)N * M;
    int failed = 0;
#pragma omp parallel if (tasks > 1)
    {
        size_t rows = ((size_t)S + 4) * (D > 0 ? D : 1);
        float *vb = malloc(sizeof(float) * 2 * rows);
        if (!vb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < tasks; t++)
            if (vb)
                bwd_head_any(grad_value, grad_loc, grad_attw, vb, vb + rows, grad_out, value,
                             spatial_shapes, level_start, loc, attw, (int)(t / M), (int)(t % M), S,
                             M, D, Lq, L, P);
        free(vb);
    }
    return failed ? DAMEX_ENOMEM : DAMEX_OK;
}
