/* conv2d input gradient as forward convolutions of dy, so that it runs on the
 * fast forward kernels instead of per-tap products with K = Cout followed by
 * a scatter.
 *
 * With xpad the padded input, y[o] = sum_i w[i] xpad[o*s + i] (per dimension)
 * gives dxpad[r] = sum over (o, i) with o*s + i = r of w[i] dy[o].  Rows
 * r = s*m + rho take the taps i = s*u + rho, u < n_rho = ceil((k - rho)/s):
 *
 *   dxpad[s*m + rho] = sum_u w[s*(n_rho-1-u) + rho] * dy[m - (n_rho-1) + u],
 *
 * a stride-1 convolution of dy padded by n_rho - 1 against the flipped
 * sub-filter, channels transposed, whose output rows m land in dx at
 * h = s*m + rho - p (those inside the image).
 *
 * Stride 1 with p <= k - 1: one phase, and padding dy by k - 1 - p gives dx's
 * rows exactly, so dx is one call of conv2d_forward (Winograd for 3x3).
 * Otherwise all sh*sw phases run in one pass of the direct kernel
 * (conv_block_8x48) over dy's padded planes, each block's columns added into
 * dx at its phase's positions: phases own disjoint positions of dx, tasks
 * disjoint blocks of a phase, so there are no atomics. */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "status.h"
#include "parallel.h"
#include "cpu.h"

#define CB CONV_BLOCK_ROWS
#define COLS CONV_BLOCK_COLS

static int exact_stride1(const struct conv2d_shape *s)
{
    return s->sh == 1 && s->sw == 1 && s->ph <= s->kh - 1 && s->pw <= s->kw - 1;
}

/* dx += conv(dy padded by (kh-1-ph, kw-1-pw), flipped transposed w) */
static int dx_stride1(float *dx, const float *dy, const float *w, const struct conv2d_shape *s)
{
    struct conv2d_shape t = {s->N, s->Cout, s->Ho, s->Wo, s->Cin, s->kh, s->kw, 1, 1,
                             s->kh - 1 - s->ph, s->kw - 1 - s->pw, 0, 0, CONV2D_AUTO};
    if (conv2d_shape_init(&t) != DAMEX_OK || t.Ho != s->H || t.Wo != s->W) return DAMEX_EINVAL;
    const long T = (long)s->kh * s->kw, nx = (long)s->N * s->Cin * s->H * s->W;
    float *wt = malloc(sizeof(float) * (size_t)(T * s->Cin * s->Cout + nx));
    if (!wt) return DAMEX_ENOMEM;
    float *g = wt + T * s->Cin * s->Cout;
    /* wt[ci][co][tap] = w[co][ci][T-1-tap] */
    for (long ci = 0; ci < s->Cin; ci++)
        for (long co = 0; co < s->Cout; co++)
            for (long k = 0; k < T; k++)
                wt[(ci * s->Cout + co) * T + k] = w[(co * s->Cin + ci) * T + T - 1 - k];
    int status = conv2d_forward(g, dy, wt, NULL, &t);
    if (status == DAMEX_OK) {
#pragma omp parallel for schedule(static) if (nx > PAR_MIN_CONV_COPY)
        for (long i = 0; i < nx; i++) dx[i] += g[i];
    }
    free(wt);
    return status;
}

/* One phase (rho, sigma) of the strided pass. */
struct dx_phase {
    int rho, sigma, nr, nc; /* taps n_rho x n_sigma */
    int rows;               /* output rows m: Ho + nr - 1 (columns: Wo + nc - 1) */
    long nqb;               /* column blocks per image */
    float *wp;              /* [Cin/CB][nr*nc*Cout][CB] */
    long *koff;             /* [nr*nc*Cout] */
};

/* d[sw*q + off] += b[q] for lo <= q < hi (constant strides vectorise) */
DAMEX_CLONES
static void add_run(float *restrict d, const float *restrict b, long lo, long hi, int sw, long off)
{
    if (sw == 1)
        for (long q = lo; q < hi; q++) d[q + off] += b[q];
    else if (sw == 2)
        for (long q = lo; q < hi; q++) d[2 * q + off] += b[q];
    else
        for (long q = lo; q < hi; q++) d[sw * q + off] += b[q];
}

/* dx[img][ci0 + r][h][v] += blk[r][c - c0] for the block's columns c = m*Wq + q
 * with q < Wo + nc - 1, h = sh*m + rho - ph and v = sw*q + sigma - pw inside
 * the image; taken a row m at a time. */
static void add_block(float *dx, const float *blk, int rows, int ci0, long c0,
                      const struct conv2d_shape *s, const struct dx_phase *f, int Wq)
{
    const long HW = (long)s->H * s->W, wide = s->Wo + f->nc - 1, off = f->sigma - s->pw;
    /* q with 0 <= sw*q + off < W, and q < wide: [qlo, qhi) */
    long qlo, qhi;
    conv_span(s->W, off, s->sw, &qlo, &qhi);
    qhi = qhi < wide ? qhi : wide;
    for (long m = c0 / Wq; m * Wq < c0 + COLS && m < f->rows; m++) {
        long h = (long)s->sh * m + f->rho - s->ph;
        if (h < 0 || h >= s->H) continue;
        /* this row's columns in the block: q in [a, b) */
        long a = c0 - m * Wq > qlo ? c0 - m * Wq : qlo;
        long b = c0 + COLS - m * Wq < qhi ? c0 + COLS - m * Wq : qhi;
        if (a >= b) continue;
        for (int r = 0; r < rows; r++)
            add_run(dx + (ci0 + r) * HW + h * s->W, blk + r * COLS + (m * Wq - c0), a, b, s->sw,
                    off);
    }
}

static int dx_strided(float *dx, const float *dy, const float *w, const struct conv2d_shape *s)
{
    if (s->N == 0) return DAMEX_OK;
    const int nrm = (s->kh + s->sh - 1) / s->sh, ncm = (s->kw + s->sw - 1) / s->sw;
    /* dy's planes, padded by the most taps a phase has, minus one */
    const struct conv2d_shape t = {s->N, s->Cout, s->Ho, s->Wo, s->Cin, nrm, ncm, 1, 1,
                                   nrm - 1, ncm - 1, 0, 0, CONV2D_DIRECT};
    const struct phases g = phases_of(&t, s->N);
    const int Cout = s->Cout, ncb = (s->Cin + CB - 1) / CB, nph = s->sh * s->sw;
    struct dx_phase f[64];
    if (nph > 64) return DAMEX_EINVAL; /* strides up to 8x8 */
    long wp_n = 0, koff_n = 0, maxq = 0;
    for (int p = 0; p < nph; p++) {
        struct dx_phase *e = &f[p];
        e->rho = p / s->sw;
        e->sigma = p % s->sw;
        e->nr = (s->kh - e->rho + s->sh - 1) / s->sh;
        e->nc = (s->kw - e->sigma + s->sw - 1) / s->sw;
        e->rows = s->Ho + e->nr - 1;
        e->nqb = e->nr > 0 && e->nc > 0 ? ((long)e->rows * g.Wq + COLS - 1) / COLS : 0;
        maxq = e->nqb > maxq ? e->nqb : maxq;
        wp_n += (long)ncb * e->nr * e->nc * Cout * CB;
        koff_n += (long)e->nr * e->nc * Cout;
    }
    /* the last blocks read up to COLS - 1 floats past the planes: a zeroed tail */
    const long xq_n = g.PB + COLS + 16;
    float *xq = malloc(sizeof(float) * (size_t)(xq_n + wp_n));
    long *koff0 = malloc(sizeof(long) * (size_t)(koff_n + 1)), *koff = koff0;
    if (!xq || !koff0) {
        free(xq);
        free(koff0);
        return DAMEX_ENOMEM;
    }
    memset(xq + g.PB, 0, sizeof(float) * (size_t)(xq_n - g.PB));
    float *wp = xq + xq_n;
    for (int p = 0; p < nph; p++) {
        struct dx_phase *e = &f[p];
        const int K = e->nr * e->nc * Cout;
        e->wp = wp;
        e->koff = koff;
        wp += (long)ncb * K * CB;
        koff += K;
        /* k = (u, v, co): plane row u + nrm - nr, column v + ncm - nc of channel co;
         * wp[cb][k][r] = w[co][ci = cb*CB + r][sh*(nr-1-u) + rho][sw*(nc-1-v) + sigma] */
        for (int k = 0; k < K; k++) {
            int u = k / (e->nc * Cout), v = k / Cout % e->nc, co = k % Cout;
            e->koff[k] = (long)co * g.CS + (long)(u + nrm - e->nr) * g.Wq + (v + ncm - e->nc);
            long tap = (long)(s->sh * (e->nr - 1 - u) + e->rho) * s->kw +
                       s->sw * (e->nc - 1 - v) + e->sigma;
            for (int cb = 0; cb < ncb; cb++)
                for (int r = 0; r < CB; r++) {
                    long ci = (long)cb * CB + r;
                    e->wp[((long)cb * K + k) * CB + r] =
                        ci < s->Cin ? w[(co * s->Cin + ci) * s->kh * s->kw + tap] : 0.0f;
                }
        }
    }
    const long planes = (long)Cout * s->N, xs = (long)s->Cin * s->H * s->W;
    const long tasks = (long)s->N * maxq * ncb * nph;
    const float zero[CB] = {0};
#pragma omp parallel if (tasks > 1 && (long)s->N * s->Cin * s->H * s->W * Cout > PAR_MIN_CONV_DX)
    {
#pragma omp for schedule(static)
        for (long q = 0; q < planes; q++) fill_phase_plane(xq, dy, s->N, &t, &g, q);
        float blk[CB * COLS];
        /* task (img, column block, channel block, phase): the phases of a block
         * add into the same lines of dx one after the other, while they are in
         * cache (phase-major, each line came from memory sh*sw times) */
#pragma omp for schedule(static)
        for (long k = 0; k < tasks; k++) {
            const int p = (int)(k % nph), cb = (int)(k / nph % ncb);
            const long qb = k / nph / ncb % maxq;
            const int n = (int)(k / nph / ncb / maxq);
            const struct dx_phase *e = &f[p];
            if (qb >= e->nqb) continue;
            const long c0 = qb * COLS;
            const int K = e->nr * e->nc * Cout;
            conv_block_8x48(blk, xq + n * g.IS + c0, e->wp + (long)cb * K * CB, e->koff, K, zero);
            int rows = s->Cin - cb * CB < CB ? s->Cin - cb * CB : CB;
            add_block(dx + n * xs, blk, rows, cb * CB, c0, s, e, g.Wq);
        }
    }
    free(xq);
    free(koff0);
    return DAMEX_OK;
}

int conv2d_dx_by_forward(float *dx, const float *dy, const float *w, const struct conv2d_shape *s)
{
    return exact_stride1(s) ? dx_stride1(dx, dy, w, s) : dx_strided(dx, dy, w, s);
}
