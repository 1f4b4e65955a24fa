/* conv2d by im2col + sgemm (the algorithm for few input channels, and the
 * copy-free 1x1 case).  The column matrix of one image, col[K,P] with row
 * k = (ci, i, j) and column p = (oh, ow), is the one scratch allocation of a
 * call; im2col and col2im run in parallel over rows / input channels
 * (disjoint outputs), the products in OpenBLAS's threads. */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"

int conv2d_is_pointwise(const struct conv2d_shape *s)
{
    return s->kh == 1 && s->kw == 1 && s->sh == 1 && s->sw == 1 && s->ph == 0 && s->pw == 0;
}

/* First and one-past-last ow whose input column ow*sw - pw + j lies in [0, W). */
static void valid_range(int Wo, int W, int sw, int pw, int j, int *lo, int *hi)
{
    long a, h;
    conv_span(W, (long)j - pw, sw, &a, &h);
    *lo = (int)(a < Wo ? a : Wo);
    *hi = (int)(h < Wo ? h : Wo);
}

/* col[k = (ci,i,j), oh*Wo + ow] = x[ci, oh*sh-ph+i, ow*sw-pw+j]  (0 outside) */
static void im2col(float *col, const float *x, const struct conv2d_shape *s)
{
    const int K = s->Cin * s->kh * s->kw, Wo = s->Wo, Ho = s->Ho;
    const long P = (long)Ho * Wo;
#pragma omp parallel for schedule(static) if ((long)K * P > PAR_MIN_CONV_COPY)
    for (int k = 0; k < K; k++) {
        int ci = k / (s->kh * s->kw), i = (k / s->kw) % s->kh, j = k % s->kw, lo, hi;
        valid_range(Wo, s->W, s->sw, s->pw, j, &lo, &hi);
        const float *xc = x + (long)ci * s->H * s->W;
        float *row = col + (long)k * P;
        for (int oh = 0; oh < Ho; oh++) {
            float *out = row + (long)oh * Wo;
            int ih = oh * s->sh - s->ph + i;
            if (ih < 0 || ih >= s->H) {
                memset(out, 0, sizeof(float) * Wo);
                continue;
            }
            const float *in = xc + (long)ih * s->W - s->pw + j;
            for (int ow = 0; ow < lo; ow++) out[ow] = 0.0f;
            if (s->sw == 1)
                memcpy(out + lo, in + lo, sizeof(float) * (hi - lo));
            else
                for (int ow = lo; ow < hi; ow++) out[ow] = in[(long)ow * s->sw];
            for (int ow = hi; ow < Wo; ow++) out[ow] = 0.0f;
        }
    }
}

DAMEX_CLONES
static void add_row(float *restrict dst, const float *restrict src, int n)
{
    for (int i = 0; i < n; i++) dst[i] += src[i];
}

/* Inverts im2col:  dx[ci, oh*sh-ph+i, ow*sw-pw+j] += dcol[(ci,i,j), oh*Wo+ow]
 * Parallel over ci: each thread owns whole input planes. */
static void col2im_accumulate(float *dx, const float *dcol, const struct conv2d_shape *s)
{
    const int Wo = s->Wo, Ho = s->Ho;
    const long P = (long)Ho * Wo;
#pragma omp parallel for schedule(static) if ((long)s->Cin * s->kh * s->kw * P > PAR_MIN_CONV_COPY)
    for (int ci = 0; ci < s->Cin; ci++) {
        float *xc = dx + (long)ci * s->H * s->W;
        for (int i = 0; i < s->kh; i++)
            for (int j = 0; j < s->kw; j++) {
                int lo, hi;
                valid_range(Wo, s->W, s->sw, s->pw, j, &lo, &hi);
                const float *row = dcol + ((long)(ci * s->kh + i) * s->kw + j) * P;
                for (int oh = 0; oh < Ho; oh++) {
                    int ih = oh * s->sh - s->ph + i;
                    if (ih < 0 || ih >= s->H) continue;
                    float *out = xc + (long)ih * s->W - s->pw + j;
                    const float *in = row + (long)oh * Wo;
                    if (s->sw == 1)
                        add_row(out + lo, in + lo, hi - lo);
                    else
                        for (int ow = lo; ow < hi; ow++) out[(long)ow * s->sw] += in[ow];
                }
            }
    }
}

int conv2d_forward_im2col(float *y, const float *x, const float *w, const float *b,
                          const struct conv2d_shape *s)
{
    const int K = s->Cin * s->kh * s->kw, P = s->Ho * s->Wo;
    const long xs = (long)s->Cin * s->H * s->W, ys = (long)s->Cout * P;
    const int pointwise = conv2d_is_pointwise(s);
    float *col = NULL;
    if (!pointwise && s->N > 0) {
        col = malloc(sizeof(float) * (size_t)K * P);
        if (!col) return DAMEX_ENOMEM;
    }
    for (int n = 0; n < s->N; n++) {
        float *yn = y + n * ys;
        if (b) {
#pragma omp parallel for schedule(static) if (ys > PAR_MIN_CONV_COPY)
            for (int co = 0; co < s->Cout; co++)
                for (int p = 0; p < P; p++) yn[(long)co * P + p] = b[co];
        }
        const float *cn = x + n * xs;
        if (!pointwise) {
            im2col(col, cn, s);
            cn = col;
        }
        /* y[n] = w[Cout,K] @ col[K,P] (+ b) */
        sgemm_rm(0, 0, s->Cout, P, K, 1.0f, w, K, cn, P, b ? 1.0f : 0.0f, yn, P);
    }
    free(col);
    return DAMEX_OK;
}

int conv2d_backward_im2col(float *dx, float *dw, const float *dy, const float *x,
                           const float *w, const struct conv2d_shape *s)
{
    const int K = s->Cin * s->kh * s->kw, P = s->Ho * s->Wo;
    const long xs = (long)s->Cin * s->H * s->W, ys = (long)s->Cout * P;
    const int pointwise = conv2d_is_pointwise(s);
    if (!dx && !dw) return DAMEX_OK;
    float *col = NULL;
    if (!pointwise && s->N > 0) {
        col = malloc(sizeof(float) * (size_t)K * P);
        if (!col) return DAMEX_ENOMEM;
    }
    for (int n = 0; n < s->N; n++) {
        const float *dyn = dy + n * ys;
        if (dw) {
            const float *cn = x + n * xs;
            if (!pointwise) {
                im2col(col, cn, s);
                cn = col;
            }
            /* dw[Cout,K] += dy[n][Cout,P] @ col[K,P]^T      (inverts y[n] = w @ col) */
            sgemm_rm(0, 1, s->Cout, K, P, 1.0f, dyn, P, cn, P, 1.0f, dw, K);
        }
        if (dx) {
            if (pointwise) {
                /* dx[n][Cin,P] += w^T[Cin,Cout] @ dy[n]     (inverts y[n] = w @ x[n]) */
                sgemm_rm(1, 0, K, P, s->Cout, 1.0f, w, K, dyn, P, 1.0f, dx + n * xs, P);
            } else {
                /* dcol[K,P] = w^T @ dy[n], then dx[n] += col2im(dcol)   (inverts col = im2col(x)) */
                sgemm_rm(1, 0, K, P, s->Cout, 1.0f, w, K, dyn, P, 0.0f, col, P);
                col2im_accumulate(dx + n * xs, col, s);
            }
        }
    }
    free(col);
    return DAMEX_OK;
}
