/* conv2d weight gradient by a register-blocked dot-product kernel over the
 * phase planes (conv_impl.h), all images in one chunk:
 *
 *   dw[co, k] += sum_c dyq[co, c] * xq[koff[k] + c],
 *   k = (ci, tap),  koff[k] = tap_offset(tap) + ci*CS,
 *
 * with dyq[co, c] = dy at column c = (img, oh, ow) and 0 in the columns that
 * are not outputs.  Each product is a [Cout, Q] @ [Q, Cin*kh*kw] reduction
 * over a long Q and a small output, where OpenBLAS's per-tap calls ran at
 * about half of the machine's rate.  Here a block of 4 channels x 6 (ci, tap)
 * rows keeps 24 vector partial sums in registers: per 16 columns, 4 + 6
 * vector loads feed 24 multiply-adds.  Columns are taken in chunks so that
 * the rows a group of blocks reads stay in L2, and the partial sums of a
 * group stay there too until the last chunk; lanes are summed at the end.
 *
 * Threads: one parallel region; the planes and dyq are shared out, then the
 * (channel group, row group) tasks, each owning its outputs (no atomics; the
 * summation order does not depend on the thread count). */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "status.h"
#include "parallel.h"

#define RB 4      /* output channels per block */
#define KB 6      /* (ci, tap) rows per block */
#define GC 8      /* channel blocks per group */
#define GK 12     /* row blocks per group */
#define CHUNK 512 /* columns per chunk: a block's 6 x rows and 4 dy rows (20 KB) stay in L1 */

/* acc[r][m] += sum_{c0 <= c < c1} dyb[r*ld + c] * xb[koff[m] + c]   (16-lane partial sums;
 * c0, c1 multiples of 16) */
DAMEX_CLONES_AVX512
static void dw_block(vf *restrict acc, const float *restrict dyb, long ld,
                     const float *restrict xb, const long *restrict koff, long c0, long c1)
{
    vf a[RB][KB];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < KB; m++) a[r][m] = acc[r * KB + m];
    const float *x0 = xb + koff[0], *x1 = xb + koff[1], *x2 = xb + koff[2], *x3 = xb + koff[3],
                *x4 = xb + koff[4], *x5 = xb + koff[5];
    for (long c = c0; c < c1; c += 16) {
        vf d[RB];
        for (int r = 0; r < RB; r++) d[r] = *(const vfu *)(dyb + r * ld + c);
#define ROW(m)                                                                                     \
    do {                                                                                           \
        vf xv = *(const vfu *)(x##m + c);                                                          \
        for (int r = 0; r < RB; r++) a[r][m] += d[r] * xv;                                         \
    } while (0)
        ROW(0);
        ROW(1);
        ROW(2);
        ROW(3);
        ROW(4);
        ROW(5);
#undef ROW
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < KB; m++) acc[r * KB + m] = a[r][m];
}

int conv2d_dw_direct(float *dw, const float *dy, const float *x, const struct conv2d_shape *s)
{
    if (s->N == 0) return DAMEX_OK;
    const struct phases g = phases_of(s, s->N);
    const int T = g.T, Cout = s->Cout, K = s->Cin * T;
    const long Q = chunk_columns(s, &g, s->N), Qp = (Q + 15) / 16 * 16;
    const int nrb = (Cout + RB - 1) / RB, nkb = (K + KB - 1) / KB;
    const int ncg = (nrb + GC - 1) / GC, nkg = (nkb + GK - 1) / GK;
    const long P = (long)s->Ho * s->Wo, ys = (long)Cout * P;
    /* xq | zero row (Qp + 16, also the planes' tail) | dyq [nrb*RB][Qp] | koff */
    const long xq_n = (long)g.nph * g.PB, dyq_n = (long)nrb * RB * Qp;
    float *xq = malloc(sizeof(float) * (size_t)(xq_n + Qp + 16 + dyq_n));
    long *koff = malloc(sizeof(long) * (size_t)nkb * KB);
    if (!xq || !koff) {
        free(xq);
        free(koff);
        return DAMEX_ENOMEM;
    }
    float *zero = xq + xq_n, *dyq = zero + Qp + 16;
    memset(zero, 0, sizeof(float) * (size_t)(Qp + 16));
    for (int k = 0; k < nkb * KB; k++)
        koff[k] = k < K ? tap_offset(s, &g, k % T) + (long)(k / T) * g.CS : xq_n;
    const long planes = (long)g.nph * s->Cin * s->N;
    int status = DAMEX_OK;
#pragma omp parallel if ((long)Cout * K * Q > PAR_MIN_CONV_BLOCKED)
    {
#pragma omp for schedule(static) nowait
        for (long q = 0; q < planes; q++) fill_phase_plane(xq, x, s->N, s, &g, q);
        /* dyq[co][img*IS + oh*Wq + ow] = dy[img][co][oh][ow], 0 elsewhere */
#pragma omp for schedule(static)
        for (int co = 0; co < nrb * RB; co++) {
            float *row = dyq + co * Qp;
            memset(row, 0, sizeof(float) * (size_t)Qp);
            if (co >= Cout) continue;
            for (int n = 0; n < s->N; n++)
                for (int oh = 0; oh < s->Ho; oh++)
                    memcpy(row + n * g.IS + (long)oh * g.Wq, dy + n * ys + co * P + (long)oh * s->Wo,
                           sizeof(float) * (size_t)s->Wo);
        }
        vf *acc = aligned_alloc(64, sizeof(vf) * GC * GK * RB * KB); /* vf: 64-byte aligned */
        if (!acc) {
#pragma omp atomic write
            status = DAMEX_ENOMEM;
        }
#pragma omp for schedule(static)
        for (int task = 0; task < ncg * nkg; task++) {
            if (!acc) continue;
            const int rb0 = task / nkg * GC, kb0 = task % nkg * GK;
            const int nr = nrb - rb0 < GC ? nrb - rb0 : GC, nk = nkb - kb0 < GK ? nkb - kb0 : GK;
            memset(acc, 0, sizeof(vf) * GC * GK * RB * KB);
            for (long c0 = 0; c0 < Qp; c0 += CHUNK) {
                const long c1 = c0 + CHUNK < Qp ? c0 + CHUNK : Qp;
                for (int kb = 0; kb < nk; kb++)
                    for (int rb = 0; rb < nr; rb++)
                        dw_block(acc + (rb * GK + kb) * RB * KB, dyq + (long)(rb0 + rb) * RB * Qp,
                                 Qp, xq, koff + (long)(kb0 + kb) * KB, c0, c1);
            }
            /* dw[co][k] += the lanes' sum */
            for (int rb = 0; rb < nr; rb++)
                for (int kb = 0; kb < nk; kb++)
                    for (int r = 0; r < RB; r++)
                        for (int m = 0; m < KB; m++) {
                            long co = (long)(rb0 + rb) * RB + r, k = (long)(kb0 + kb) * KB + m;
                            if (co >= Cout || k >= K) continue;
                            vf v = acc[(rb * GK + kb) * RB * KB + r * KB + m];
                            float t = 0.0f;
                            for (int l = 0; l < 16; l++) t += v[l];
                            dw[co * K + k] += t;
                        }
        }
        free(acc);
    }
    free(xq);
    free(koff);
    return status;
}
