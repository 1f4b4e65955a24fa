/* conv2d as a sum of shifted matrix products, one sgemm per kernel tap, with
 * no im2col matrix (the algorithm for Cin >= CONV2D_SHIFTED_MIN_CIN).
 *
 * The zero-padded image is split into sh*sw phase planes (conv_impl.h,
 * conv_phases.c), the images of a chunk side by side.  Tap (i, j) =
 * (qi*sh + a, qj*sw + b) then reads phase (a, b) shifted by (qi, qj), a
 * plain row-major [Cin, Ho*Wq] matrix with row stride CS:
 *
 *   yq[co, oh*Wq + ow] = sum_{taps} sum_ci w[co,ci,i,j] xq[a][b][ci][oh+qi][ow+qj]
 *
 * with one column per (img, oh, ow).  Columns ow >= Wo wrap into the next row
 * and rows oh >= Ho into the next image: they are garbage and are cropped
 * (forward) or fed zeros (backward).  Each product is [Cout, Cin] @
 * [Cin, Ho*Wq] and reads cache-resident planes: faster than im2col's
 * K = Cin*kh*kw product over a matrix kh*kw times the image.
 * One scratch allocation per call; fills run in parallel over planes. */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "status.h"
#include "parallel.h"

/* Images per chunk: as many as keep the chunk's scratch under this many
 * floats; column tiles of the per-tap products: output blocks (rows x columns)
 * under this many floats.  Both default to off (one image per chunk, whole
 * columns): on a quieter stretch of the shared 2-core machine, 2 x 25
 * interleaved runs had 64-channel 3x3 convs ~4% faster that way than with
 * 16 MB chunks and 256 KB tiles (forward 6.85 vs 7.14 ms, backward 14.8 vs
 * 15.4 ms).  Kept as build-time knobs (-DSHIFTED_...) for other machines. */
#ifndef SHIFTED_SCRATCH_FLOATS
#define SHIFTED_SCRATCH_FLOATS 1L
#endif
#ifndef SHIFTED_TILE_FLOATS
#define SHIFTED_TILE_FLOATS (1L << 40)
#endif

static long tile_columns(int rows, long Q)
{
    long tw = SHIFTED_TILE_FLOATS / rows;
    tw = tw < 256 ? 256 : tw - tw % 64;
    return tw < Q ? tw : Q;
}

/* Images per chunk: as many as keep the chunk's scratch under SHIFTED_SCRATCH_FLOATS. */
static int images_per_chunk(const struct conv2d_shape *s, int backward)
{
    const struct phases g = phases_of(s, 1);
    long per_image = ((backward ? 2L : 1L) * g.nph * s->Cin + s->Cout) * g.IS;
    long nb = SHIFTED_SCRATCH_FLOATS / per_image;
    return nb < 1 ? 1 : (nb > s->N ? s->N : (int)nb);
}

/* wt[t][co][ci] = w[co][ci][t]: one [Cout, Cin] matrix per tap. */
static void repack_taps(float *wt, const float *w, const struct conv2d_shape *s, int T)
{
    for (int co = 0; co < s->Cout; co++)
        for (int ci = 0; ci < s->Cin; ci++)
            for (int t = 0; t < T; t++)
                wt[((long)t * s->Cout + co) * s->Cin + ci] = w[((long)co * s->Cin + ci) * T + t];
}

int conv2d_forward_shifted(float *y, const float *x, const float *w, const float *b,
                           const struct conv2d_shape *s)
{
    if (s->N == 0) return DAMEX_OK;
    const struct phases g = phases_of(s, images_per_chunk(s, 0));
    const long xs = (long)s->Cin * s->H * s->W, P = (long)s->Ho * s->Wo, ys = (long)s->Cout * P;
    const long wsz = (long)g.T * s->Cout * s->Cin;
    float *xq = malloc(sizeof(float) * ((size_t)g.nph * g.PB + (size_t)s->Cout * g.CS + wsz));
    if (!xq) return DAMEX_ENOMEM;
    float *yq = xq + (size_t)g.nph * g.PB, *wt = yq + (size_t)s->Cout * g.CS;
    repack_taps(wt, w, s, g.T);
    for (int n0 = 0; n0 < s->N; n0 += g.nb) {
        const int cnt = s->N - n0 < g.nb ? s->N - n0 : g.nb;
        const long Q = chunk_columns(s, &g, cnt);
        fill_phases(xq, x + n0 * xs, cnt, s, &g);
        const long tw = tile_columns(s->Cout, Q);
        for (long c0 = 0; c0 < Q; c0 += tw)
            for (int t = 0; t < g.T; t++)
                /* yq[Cout, Q] (+)= w[:,:,i,j] @ xq shifted by tap t, columns c0 .. c0+tw */
                sgemm_rm(0, 0, s->Cout, (int)(Q - c0 < tw ? Q - c0 : tw), s->Cin, 1.0f,
                         wt + (long)t * s->Cout * s->Cin, s->Cin, xq + tap_offset(s, &g, t) + c0,
                         (int)g.CS, t ? 1.0f : 0.0f, yq + c0, (int)g.CS);
        const long rows = (long)cnt * s->Cout;
#pragma omp parallel for schedule(static) if (rows * P > PAR_MIN_CONV_COPY)
        for (long q = 0; q < rows; q++) {
            int img = (int)(q / s->Cout), co = (int)(q % s->Cout);
            float bias = b ? b[co] : 0.0f;
            float *dst = y + (n0 + img) * ys + (long)co * P;
            for (int oh = 0; oh < s->Ho; oh++) {
                const float *src = yq + (long)co * g.CS + (long)img * g.IS + (long)oh * g.Wq;
                for (int ow = 0; ow < s->Wo; ow++) dst[(long)oh * s->Wo + ow] = src[ow] + bias;
            }
        }
    }
    free(xq);
    return DAMEX_OK;
}

int conv2d_backward_shifted(float *dx, float *dw, const float *dy, const float *x,
                            const float *w, const struct conv2d_shape *s)
{
    if (s->N == 0) return DAMEX_OK;
    const struct phases g = phases_of(s, images_per_chunk(s, 1));
    const long xs = (long)s->Cin * s->H * s->W, P = (long)s->Ho * s->Wo, ys = (long)s->Cout * P;
    const long wsz = (long)g.T * s->Cout * s->Cin;
    /* xq (dw) | dxq (dx) | dyq | wt | dwt */
    size_t total = (size_t)2 * g.nph * g.PB + (size_t)s->Cout * g.CS + 2 * (size_t)wsz;
    float *xq = malloc(sizeof(float) * total);
    if (!xq) return DAMEX_ENOMEM;
    float *dxq = xq + (size_t)g.nph * g.PB, *dyq = dxq + (size_t)g.nph * g.PB;
    float *wt = dyq + (size_t)s->Cout * g.CS, *dwt = wt + wsz;
    repack_taps(wt, w, s, g.T);
    memset(dwt, 0, sizeof(float) * wsz);
    for (int n0 = 0; n0 < s->N; n0 += g.nb) {
        const int cnt = s->N - n0 < g.nb ? s->N - n0 : g.nb;
        const long Q = chunk_columns(s, &g, cnt);
        /* dyq[co][img][oh*Wq + ow] = dy[img][co][oh][ow]; 0 in the wrapped columns
         * ow >= Wo and the rows oh >= Ho, so they add nothing below */
        const long rows = (long)cnt * s->Cout;
#pragma omp parallel for schedule(static) if (rows * g.IS > PAR_MIN_CONV_COPY)
        for (long q = 0; q < rows; q++) {
            int img = (int)(q / s->Cout), co = (int)(q % s->Cout);
            float *dst = dyq + (long)co * g.CS + (long)img * g.IS;
            const float *src = dy + (n0 + img) * ys + (long)co * P;
            for (int oh = 0; oh < s->Ho; oh++) {
                memcpy(dst + (long)oh * g.Wq, src + (long)oh * s->Wo, sizeof(float) * s->Wo);
                memset(dst + (long)oh * g.Wq + s->Wo, 0, sizeof(float) * (g.Wq - s->Wo));
            }
            memset(dst + (long)s->Ho * g.Wq, 0, sizeof(float) * (g.IS - (long)s->Ho * g.Wq));
        }
        if (dw) {
            fill_phases(xq, x + n0 * xs, cnt, s, &g);
            for (int t = 0; t < g.T; t++)
                /* dw[:,:,i,j] += dyq[Cout, Q] @ (xq shifted by tap t)^T   (inverts yq += w_t @ xq_t) */
                sgemm_rm(0, 1, s->Cout, s->Cin, (int)Q, 1.0f, dyq, (int)g.CS,
                         xq + tap_offset(s, &g, t), (int)g.CS, 1.0f,
                         dwt + (long)t * s->Cout * s->Cin, s->Cin);
        }
        if (dx) {
            memset(dxq, 0, sizeof(float) * (size_t)g.nph * g.PB);
            const long tw = tile_columns(s->Cin, Q);
            for (long c0 = 0; c0 < Q; c0 += tw)
                for (int t = 0; t < g.T; t++)
                    /* dxq shifted by tap t += w_t^T @ dyq    (inverts yq += w_t @ xq_t);
                     * rows of dxq never overlap: each image block has a spare row for the shift */
                    sgemm_rm(1, 0, s->Cin, (int)(Q - c0 < tw ? Q - c0 : tw), s->Cout, 1.0f,
                             wt + (long)t * s->Cout * s->Cin, s->Cin, dyq + c0, (int)g.CS, 1.0f,
                             dxq + tap_offset(s, &g, t) + c0, (int)g.CS);
            unfill_phases_accumulate(dx + n0 * xs, dxq, cnt, s, &g);
        }
    }
    if (dw)
        for (int co = 0; co < s->Cout; co++)
            for (int ci = 0; ci < s->Cin; ci++)
                for (int t = 0; t < g.T; t++)
                    dw[((long)co * s->Cin + ci) * g.T + t] +=
                        dwt[((long)t * s->Cout + co) * s->Cin + ci];
    free(xq);
    return DAMEX_OK;
}
