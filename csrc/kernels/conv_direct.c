/* conv2d forward by a register-blocked direct kernel over the phase planes
 * (conv_impl.h): no im2col matrix, no BLAS.
 *
 * For one image, with yq[co, c] the per-tap sum of conv_shifted.c (c = oh*Wq + ow):
 *
 *   yq[co, c] = b[co] + sum_{t, ci} w[co, ci, t] * xq[tap_offset(t) + ci*CS + c]
 *
 * A block of CB = 8 output channels by COLS = 48 consecutive columns is held
 * in 24 vector accumulators while the kernel walks every (ci, tap): per step,
 * three vector loads of one shifted plane row and eight weight broadcasts
 * feed 24 multiply-adds, so the loop is bound by the FMA units rather than by
 * memory, and no packed copy of the input is made per tap (OpenBLAS packs
 * the shifted matrix again for every tap).  The columns past Ho*Wq and the
 * wrapped columns ow >= Wo are garbage and are cropped: with AVX-512 by
 * masked stores straight from the accumulators into y (5-8% faster than
 * through a block buffer and row copies), else by copies; channels are
 * padded to a multiple of CB with zero weights.
 *
 * Threads: one parallel region per call; the weight packing and the phase
 * planes of all images, then the (image, column block, channel block) tasks
 * are shared out with static schedules over disjoint outputs (no atomics;
 * results do not depend on the thread count).  Two synchronisation points a
 * call, each of which may cost a sleeping thread's wake-up (damex/_lib.py). */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "status.h"
#include "parallel.h"

#define CB CONV_BLOCK_ROWS
#define COLS CONV_BLOCK_COLS
#define VB (COLS / 16)  /* vectors of 16 columns per block */
#define BCAST(v) ((vf){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v})

/* (conv_impl.h) Here k = (ci, tap) and koff[k] = tap_offset(tap) + ci*CS: one
 * flat loop however few the channels, 3 for an RGB stem. */
DAMEX_CLONES_AVX512
void conv_block_8x48(float *restrict yb, const float *restrict xb, const float *restrict wb,
                     const long *restrict koff, int K, const float *restrict bias)
{
    vf acc[CB][VB];
    for (int r = 0; r < CB; r++)
        for (int v = 0; v < VB; v++) acc[r][v] = BCAST(bias[r]);
    for (int k = 0; k < K; k++) {
        const float *xr = xb + koff[k];
        vf x0 = *(const vfu *)xr, x1 = *(const vfu *)(xr + 16), x2 = *(const vfu *)(xr + 32);
        const float *wr = wb + (long)k * CB;
        for (int r = 0; r < CB; r++) {
            vf wv = BCAST(wr[r]);
            acc[r][0] += wv * x0;
            acc[r][1] += wv * x1;
            acc[r][2] += wv * x2;
        }
    }
    for (int r = 0; r < CB; r++)
        for (int v = 0; v < VB; v++) *(vfu *)(yb + r * COLS + 16 * v) = acc[r][v];
}

/* Copies the valid part of a block (columns c0 .. c0+COLS of yq, channels
 * co0 .. co0+rows) into y[Cout, Ho, Wo]: column c is (oh, ow) = (c / Wq, c % Wq),
 * kept when ow < Wo and oh < Ho. */
static void store_block(float *y, const float *blk, int rows, int co0, long c0,
                        const struct conv2d_shape *s, const struct phases *g)
{
    const long P = (long)s->Ho * s->Wo, Q = (long)s->Ho * g->Wq;
    const long cend = c0 + COLS < Q ? c0 + COLS : Q;
    for (long c = c0; c < cend;) {
        long oh = c / g->Wq, ow = c - oh * g->Wq, row_end = oh * g->Wq + s->Wo;
        if (ow < s->Wo) {
            long e = cend < row_end ? cend : row_end;
            for (int r = 0; r < rows; r++)
                memcpy(y + (long)(co0 + r) * P + oh * s->Wo + ow, blk + r * COLS + (c - c0),
                       sizeof(float) * (size_t)(e - c));
        }
        c = (oh + 1) * g->Wq;
    }
}

#ifdef DAMEX_X86
#include <immintrin.h>
#include <stdint.h>

/* Where the outputs of one column block go in a channel plane of y: for each
 * of its VB vectors, up to two masked stores (with Wo >= 16 a vector's columns
 * run into at most the next row).  Column c of row m is y[c - m*(Wq - Wo)]. */
struct store_plan {
    long c0;            /* the block's first column: the plan's key */
    long off[VB][2];    /* where lane 0 of the store would land */
    __mmask16 mask[VB][2];
};

static void plan_stores(struct store_plan *sp, long c0, const struct conv2d_shape *s, long Wq)
{
    const long gap = Wq - s->Wo;
    long m = c0 / Wq, q = c0 - m * Wq;
    sp->c0 = c0;
    for (int v = 0; v < VB; v++) {
        const long m0 = m, cv = c0 + 16 * v;
        sp->off[v][0] = cv - m0 * gap;
        sp->off[v][1] = cv - (m0 + 1) * gap;
        sp->mask[v][0] = sp->mask[v][1] = 0;
        for (int i = 0; i < 16; i++) {
            if (q < s->Wo && m < s->Ho) sp->mask[v][m != m0] |= (__mmask16)(1u << i);
            if (++q == Wq) {
                q = 0;
                m++;
            }
        }
    }
}

/* conv_block_8x48 storing its valid columns straight into y (channel planes of
 * P floats from y) with masked stores: no block buffer and no copies. */
__attribute__((target("avx512f")))
static void direct_block_store(float *y, long P, int rows, const float *xb, const float *wb,
                               const long *koff, int K, const float *bias,
                               const struct store_plan *sp)
{
    __m512 a[CB][VB];
    for (int r = 0; r < CB; r++)
        for (int v = 0; v < VB; v++) a[r][v] = _mm512_set1_ps(bias[r]);
    for (int k = 0; k < K; k++) {
        const float *xr = xb + koff[k], *wr = wb + (long)k * CB;
        __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16), x2 = _mm512_loadu_ps(xr + 32);
        for (int r = 0; r < CB; r++) {
            __m512 w = _mm512_set1_ps(wr[r]);
            a[r][0] = _mm512_fmadd_ps(w, x0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(w, x1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(w, x2, a[r][2]);
        }
    }
    for (int r = 0; r < CB; r++) {
        if (r >= rows) break;
        /* integer addresses: lane 0 of a store may lie outside y, its lane is masked off */
        const uintptr_t base = (uintptr_t)(y + r * P);
        for (int v = 0; v < VB; v++)
            for (int j = 0; j < 2; j++)
                if (sp->mask[v][j])
                    _mm512_mask_storeu_ps((void *)(base + sizeof(float) * sp->off[v][j]),
                                          sp->mask[v][j], a[r][v]);
    }
}
#endif

int conv2d_direct_preferred(void)
{
#ifdef DAMEX_X86
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

int conv2d_forward_direct(float *y, const float *x, const float *w, const float *b,
                          const struct conv2d_shape *s)
{
    if (s->N == 0) return DAMEX_OK;
    /* all images' planes at once (xq[phase][ci][img][r][c]), so that a call
     * has two synchronisation points however many images it has */
    const struct phases g = phases_of(s, s->N);
    const int T = g.T, Cin = s->Cin, Cout = s->Cout, K = T * Cin, ncb = (Cout + CB - 1) / CB;
    const long Q = chunk_columns(s, &g, 1), nqb = (Q + COLS - 1) / COLS;
    const long P = (long)s->Ho * s->Wo, ys = (long)Cout * P;
#ifdef DAMEX_X86
    /* AVX-512 masked stores straight into y (rows of 16+ outputs, see plan_stores) */
    const int masked = s->Wo >= 16 && conv2d_direct_preferred();
#endif
    /* the last column block of the last plane reads up to COLS - 1 floats past
     * the planes (see conv_impl.h): a zeroed tail */
    const long xq_n = (long)g.nph * g.PB + COLS + 16, wp_n = (long)ncb * K * CB;
    float *xq = malloc(sizeof(float) * (size_t)(xq_n + wp_n + (long)ncb * CB));
    long *koff = malloc(sizeof(long) * (size_t)K);
    if (!xq || !koff) {
        free(xq);
        free(koff);
        return DAMEX_ENOMEM;
    }
    float *wp = xq + xq_n, *bp = wp + wp_n;
    memset(xq + g.nph * g.PB, 0, sizeof(float) * (size_t)(xq_n - g.nph * g.PB));
    for (long co = 0; co < (long)ncb * CB; co++) bp[co] = co < Cout && b ? b[co] : 0.0f;
    /* k = (ci, tap): the taps of one channel read neighbouring columns of the
     * same planes, which stay in L1 from one k to the next */
    for (int ci = 0; ci < Cin; ci++)
        for (int t = 0; t < T; t++) koff[ci * T + t] = tap_offset(s, &g, t) + ci * g.CS;
    const long planes = (long)g.nph * Cin * s->N, tasks = (long)s->N * nqb * ncb;
#pragma omp parallel if ((long)s->N * ncb * CB * Q * K > PAR_MIN_CONV_BLOCKED)
    {
        /* wp[cb][ci][t][r] = w[cb*CB + r][ci][t] (0 for padded channels) */
#pragma omp for schedule(static) nowait
        for (long cb = 0; cb < ncb; cb++)
            for (int r = 0; r < CB; r++) {
                long co = cb * CB + r;
                for (long k = 0; k < K; k++)
                    wp[(cb * K + k) * CB + r] = co < Cout ? w[co * K + k] : 0.0f;
            }
#pragma omp for schedule(static)
        for (long q = 0; q < planes; q++) fill_phase_plane(xq, x, s->N, s, &g, q);
        /* (img, column block) outer, channel blocks inner: a thread's run of
         * tasks reuses the same planes */
        float blk[CB * COLS];
#ifdef DAMEX_X86
        struct store_plan plan = {.c0 = -1};
#endif
#pragma omp for schedule(static)
        for (long k = 0; k < tasks; k++) {
            int cb = (int)(k % ncb), n = (int)(k / ncb / nqb);
            long c0 = k / ncb % nqb * COLS;
            int rows = Cout - cb * CB < CB ? Cout - cb * CB : CB;
#ifdef DAMEX_X86
            if (masked) { /* consecutive tasks share a column block, and its plan */
                if (plan.c0 != c0) plan_stores(&plan, c0, s, g.Wq);
                direct_block_store(y + n * ys + (long)cb * CB * P, P, rows, xq + n * g.IS + c0,
                                   wp + (long)cb * K * CB, koff, K, bp + cb * CB, &plan);
                continue;
            }
#endif
            conv_block_8x48(blk, xq + n * g.IS + c0, wp + (long)cb * K * CB, koff, K, bp + cb * CB);
            store_block(y + n * ys, blk, rows, cb * CB, c0, s, &g);
        }
    }
    free(xq);
    free(koff);
    return DAMEX_OK;
}
