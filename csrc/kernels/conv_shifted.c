/* conv2d as a sum of shifted matrix products, one sgemm per kernel tap, with
 * no im2col matrix (the algorithm for Cin >= CONV2D_SHIFTED_MIN_CIN).
 *
 * The zero-padded image (Hp = H + 2ph, Wp = W + 2pw) is split into sh*sw
 * phase planes, xq[a][b][ci][r][c] = xpad[ci][r*sh + a][c*sw + b], of
 * Hq = ceil(Hp/sh) rows of Wq = ceil(Wp/sw) (plus one spare row per channel).
 * Tap (i, j) = (qi*sh + a, qj*sw + b) then reads phase (a, b) shifted by
 * (qi, qj), a plain row-major [Cin, Ho*Wq] matrix with row stride CS:
 *
 *   yq[co, oh*Wq + ow] = sum_{taps} sum_ci w[co,ci,i,j] xq[a][b][ci][oh+qi][ow+qj]
 *
 * Columns ow >= Wo of yq wrap into the next row: they are garbage and are
 * cropped (forward) or fed zeros (backward).  Each product is [Cout, Cin] @
 * [Cin, Ho*Wq] and reads cache-resident planes: faster than im2col's
 * K = Cin*kh*kw product over a matrix kh*kw times the image.
 * One scratch allocation per call; fills run in parallel over planes. */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "status.h"

struct phases {
    int Hq, Wq, T, nph; /* phase rows/cols, taps kh*kw, phases sh*sw */
    long CS, PB, Q;     /* channel stride (Hq+1)*Wq, phase block Cin*CS, Ho*Wq */
};

static struct phases phases_of(const struct conv2d_shape *s)
{
    struct phases g;
    g.Hq = (s->H + 2 * s->ph + s->sh - 1) / s->sh;
    g.Wq = (s->W + 2 * s->pw + s->sw - 1) / s->sw;
    g.T = s->kh * s->kw;
    g.nph = s->sh * s->sw;
    g.CS = (long)(g.Hq + 1) * g.Wq;
    g.PB = (long)s->Cin * g.CS;
    g.Q = (long)s->Ho * g.Wq;
    return g;
}

/* Offset in xq of tap t = (i, j): phase (i % sh, j % sw), shifted by (i / sh, j / sw). */
static long tap_offset(const struct conv2d_shape *s, const struct phases *g, int t)
{
    int i = t / s->kw, j = t % s->kw;
    return (long)((i % s->sh) * s->sw + j % s->sw) * g->PB + (long)(i / s->sh) * g->Wq + j / s->sw;
}

/* xq[a][b][ci][r][c] = x[ci][r*sh + a - ph][c*sw + b - pw]  (0 outside the image) */
static void fill_phases(float *xq, const float *x, const struct conv2d_shape *s,
                        const struct phases *g)
{
#pragma omp parallel for schedule(static) if (g->nph * g->PB > 32768)
    for (long pc = 0; pc < (long)g->nph * s->Cin; pc++) {
        int ph_i = (int)(pc / s->Cin), ci = (int)(pc % s->Cin);
        int a = ph_i / s->sw, b = ph_i % s->sw;
        float *dst = xq + ph_i * g->PB + (long)ci * g->CS;
        const float *src = x + (long)ci * s->H * s->W;
        for (int r = 0; r <= g->Hq; r++) {
            float *row = dst + (long)r * g->Wq;
            int ir = r * s->sh + a - s->ph;
            if (ir < 0 || ir >= s->H) {
                memset(row, 0, sizeof(float) * g->Wq);
                continue;
            }
            const float *in = src + (long)ir * s->W;
            if (s->sw == 1) { /* zeros | the image row | zeros */
                int lo = s->pw < g->Wq ? s->pw : g->Wq;
                int hi = s->pw + s->W < g->Wq ? s->pw + s->W : g->Wq;
                memset(row, 0, sizeof(float) * lo);
                memcpy(row + lo, in, sizeof(float) * (hi - lo));
                memset(row + hi, 0, sizeof(float) * (g->Wq - hi));
                continue;
            }
            for (int c = 0; c < g->Wq; c++) {
                int ic = c * s->sw + b - s->pw;
                row[c] = ic >= 0 && ic < s->W ? in[ic] : 0.0f;
            }
        }
    }
}

/* Inverts fill_phases:  dx[ci][r][c] += dxq[(r+ph) % sh][(c+pw) % sw][ci][(r+ph)/sh][(c+pw)/sw] */
static void unfill_phases_accumulate(float *dx, const float *dxq, const struct conv2d_shape *s,
                                     const struct phases *g)
{
#pragma omp parallel for schedule(static) if (g->nph * g->PB > 32768)
    for (int ci = 0; ci < s->Cin; ci++)
        for (int r = 0; r < s->H; r++) {
            int pr = r + s->ph, a = pr % s->sh, qr = pr / s->sh;
            float *out = dx + ((long)ci * s->H + r) * s->W;
            for (int c = 0; c < s->W; c++) {
                int pc = c + s->pw, b = pc % s->sw;
                out[c] += dxq[(long)(a * s->sw + b) * g->PB + (long)ci * g->CS +
                              (long)qr * g->Wq + pc / s->sw];
            }
        }
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
    const struct phases g = phases_of(s);
    const long xs = (long)s->Cin * s->H * s->W, P = (long)s->Ho * s->Wo, ys = (long)s->Cout * P;
    const long wsz = (long)g.T * s->Cout * s->Cin;
    float *xq = malloc(sizeof(float) * ((size_t)g.nph * g.PB + (size_t)s->Cout * g.Q + wsz));
    if (!xq) return DAMEX_ENOMEM;
    float *yq = xq + (size_t)g.nph * g.PB, *wt = yq + (size_t)s->Cout * g.Q;
    repack_taps(wt, w, s, g.T);
    for (int n = 0; n < s->N; n++) {
        fill_phases(xq, x + n * xs, s, &g);
        for (int t = 0; t < g.T; t++)
            /* yq[Cout, Q] (+)= w[:,:,i,j] @ xq shifted by tap t */
            sgemm_rm(0, 0, s->Cout, (int)g.Q, s->Cin, 1.0f, wt + (long)t * s->Cout * s->Cin,
                     s->Cin, xq + tap_offset(s, &g, t), (int)g.CS, t ? 1.0f : 0.0f, yq, (int)g.Q);
        float *yn = y + n * ys;
#pragma omp parallel for schedule(static) if (ys > 32768)
        for (int co = 0; co < s->Cout; co++) {
            float bias = b ? b[co] : 0.0f;
            for (int oh = 0; oh < s->Ho; oh++) {
                const float *src = yq + (long)co * g.Q + (long)oh * g.Wq;
                float *dst = yn + (long)co * P + (long)oh * s->Wo;
                for (int ow = 0; ow < s->Wo; ow++) dst[ow] = src[ow] + bias;
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
    const struct phases g = phases_of(s);
    const long xs = (long)s->Cin * s->H * s->W, P = (long)s->Ho * s->Wo, ys = (long)s->Cout * P;
    const long wsz = (long)g.T * s->Cout * s->Cin;
    /* xq (dw) | dxq (dx) | dyq | wt | dwt */
    size_t total = (size_t)2 * g.nph * g.PB + (size_t)s->Cout * g.Q + 2 * (size_t)wsz;
    float *xq = malloc(sizeof(float) * total);
    if (!xq) return DAMEX_ENOMEM;
    float *dxq = xq + (size_t)g.nph * g.PB, *dyq = dxq + (size_t)g.nph * g.PB;
    float *wt = dyq + (size_t)s->Cout * g.Q, *dwt = wt + wsz;
    repack_taps(wt, w, s, g.T);
    memset(dwt, 0, sizeof(float) * wsz);
    for (int n = 0; n < s->N; n++) {
        const float *dyn = dy + n * ys;
        /* dyq[co, oh*Wq + ow] = dy[co, oh, ow], 0 in the wrapped columns ow >= Wo */
#pragma omp parallel for schedule(static) if (ys > 32768)
        for (int co = 0; co < s->Cout; co++)
            for (int oh = 0; oh < s->Ho; oh++) {
                float *dst = dyq + (long)co * g.Q + (long)oh * g.Wq;
                memcpy(dst, dyn + (long)co * P + (long)oh * s->Wo, sizeof(float) * s->Wo);
                memset(dst + s->Wo, 0, sizeof(float) * (g.Wq - s->Wo));
            }
        if (dw) {
            fill_phases(xq, x + n * xs, s, &g);
            for (int t = 0; t < g.T; t++)
                /* dw[:,:,i,j] += dyq[Cout, Q] @ (xq shifted by tap t)^T   (inverts yq += w_t @ xq_t) */
                sgemm_rm(0, 1, s->Cout, s->Cin, (int)g.Q, 1.0f, dyq, (int)g.Q,
                         xq + tap_offset(s, &g, t), (int)g.CS, 1.0f,
                         dwt + (long)t * s->Cout * s->Cin, s->Cin);
        }
        if (dx) {
            memset(dxq, 0, sizeof(float) * (size_t)g.nph * g.PB);
            for (int t = 0; t < g.T; t++)
                /* dxq shifted by tap t += w_t^T @ dyq        (inverts yq += w_t @ xq_t);
                 * channels of dxq never overlap: CS leaves a spare row for the shift */
                sgemm_rm(1, 0, s->Cin, (int)g.Q, s->Cout, 1.0f, wt + (long)t * s->Cout * s->Cin,
                         s->Cin, dyq, (int)g.Q, 1.0f, dxq + tap_offset(s, &g, t), (int)g.CS);
            unfill_phases_accumulate(dx + n * xs, dxq, s, &g);
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
