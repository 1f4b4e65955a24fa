/* conv2d forward for 3x3 kernels at stride 1 by Winograd's minimal filtering
 * F(2x2, 3x3) (Lavin & Gray, 2016): each 2x2 output tile costs 16
 * multiply-adds per (co, ci) instead of 36, 2.25x fewer.
 *
 * With d the 4x4 input patch of a tile (zero padded), g a 3x3 filter:
 *   U = G g G^T,  V = B^T d B,  M = sum_ci U (.) V  (elementwise, 16 entries),
 *   Y = A^T M A  (the 2x2 outputs), plus the bias,
 *   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],
 *   G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
 *   A^T = [1 1 1 0; 0 1 -1 -1].
 * The sum over ci is, for each of the 16 entries, a [Cout, Cin] @ [Cin, tiles]
 * product, run by the register-blocked kernel of conv_direct.c on 8 channels
 * x 48 tiles.  The transforms use only additions and halvings, so the result
 * differs from the direct sum by rounding alone (errors ~1e-6 relative).
 *
 * Threads: one parallel region; weight transform and padded input planes
 * (conv_impl.h; split into even and odd columns) are shared out, then tasks of 48 tiles
 * of one image, each with its own transformed-input buffer [16][Cin][48]
 * running every channel block, so V is made once and used Cout/8 times. */
#include "conv_impl.h"

#include <stdlib.h>
#include <string.h>

#include "status.h"
#include "parallel.h"

#define CB CONV_BLOCK_ROWS
#define NT CONV_BLOCK_COLS /* tiles per task */

int conv2d_winograd_applies(const struct conv2d_shape *s)
{
    return s->kh == 3 && s->kw == 3 && s->sh == 1 && s->sw == 1;
}

/* up[e][cb][ci][r] = (G g G^T)[e] of g = w[cb*CB + r][ci] (0 for padded channels) */
static void transform_weights(float *up, const float *w, int cb, int ncb, int Cin, int Cout)
{
    for (int r = 0; r < CB; r++) {
        int co = cb * CB + r;
        for (int ci = 0; ci < Cin; ci++) {
            float u[16];
            if (co < Cout) {
                const float *g = w + ((long)co * Cin + ci) * 9;
                float t[4][3]; /* G g */
                for (int j = 0; j < 3; j++) {
                    t[0][j] = g[j];
                    t[1][j] = 0.5f * (g[j] + g[3 + j] + g[6 + j]);
                    t[2][j] = 0.5f * (g[j] - g[3 + j] + g[6 + j]);
                    t[3][j] = g[6 + j];
                }
                for (int i = 0; i < 4; i++) { /* (G g) G^T */
                    u[4 * i + 0] = t[i][0];
                    u[4 * i + 1] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
                    u[4 * i + 2] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
                    u[4 * i + 3] = t[i][2];
                }
            } else {
                memset(u, 0, sizeof u);
            }
            for (int e = 0; e < 16; e++)
                up[(((long)e * ncb + cb) * Cin + ci) * CB + r] = u[e];
        }
    }
}

/* v[e][ci][jo + j] = (B^T d B)[e] for the tiles j < n of one tile row.  The
 * padded image is split into its even and odd columns (two phase planes,
 * conv_impl.h), so that the patch of tile j is columns j, j (odd), j+1, j+1
 * (odd) of rows 0..3 below q: unit strides, and the loop vectorises over tiles. */
DAMEX_CLONES_AVX512
static void transform_input_run(float *restrict v, const float *restrict q, long PB, long CS,
                                int Wq, int n, int jo, int Cin)
{
    const long E = (long)Cin * NT; /* stride of e in v */
    for (int ci = 0; ci < Cin; ci++) {
        /* rows 0..3 of the patches, even (e) and odd (o) columns */
        const float *restrict e0 = q + ci * CS, *restrict e1 = e0 + Wq, *restrict e2 = e1 + Wq,
                    *restrict e3 = e2 + Wq;
        const float *restrict o0 = e0 + PB, *restrict o1 = e1 + PB, *restrict o2 = e2 + PB,
                    *restrict o3 = e3 + PB;
        float *restrict vc = v + (long)ci * NT + jo;
        /* the 16 stores of a tile go to rows E apart: no overlap */
#pragma GCC ivdep
        for (int j = 0; j < n; j++) {
            /* column k of B^T d, for d's columns 2j, 2j+1, 2j+2, 2j+3 */
#define BTD(k, r0, r1, r2, r3)                                                                     \
    float a0##k = r0 - r2, a1##k = r1 + r2, a2##k = r2 - r1, a3##k = r1 - r3
            BTD(0, e0[j], e1[j], e2[j], e3[j]);
            BTD(1, o0[j], o1[j], o2[j], o3[j]);
            BTD(2, e0[j + 1], e1[j + 1], e2[j + 1], e3[j + 1]);
            BTD(3, o0[j + 1], o1[j + 1], o2[j + 1], o3[j + 1]);
#undef BTD
            /* row i of (B^T d) B */
#define DB(i)                                                                                      \
    vc[(4 * i + 0) * E + j] = a##i##0 - a##i##2;                                                   \
    vc[(4 * i + 1) * E + j] = a##i##1 + a##i##2;                                                   \
    vc[(4 * i + 2) * E + j] = a##i##2 - a##i##1;                                                   \
    vc[(4 * i + 3) * E + j] = a##i##1 - a##i##3
            DB(0);
            DB(1);
            DB(2);
            DB(3);
#undef DB
        }
    }
}

/* The task's tiles t0 .. t0+NT, cut into runs along tile rows; tiles past the
 * image's last are zero.  xq: the image's even-column plane. */
static void transform_input(float *v, const float *xq, const struct phases *g, int tw, long t0,
                            long ntiles, int Cin)
{
    long end = t0 + NT < ntiles ? t0 + NT : ntiles;
    for (long t = t0; t < end;) {
        long row = t / tw, col = t % tw;
        int n = (int)((tw - col) < end - t ? tw - col : end - t);
        transform_input_run(v, xq + 2 * row * g->Wq + col, g->PB, g->CS, g->Wq, n, (int)(t - t0),
                            Cin);
        t += n;
    }
    if (end - t0 < NT)
        for (int e = 0; e < 16; e++)
            for (int ci = 0; ci < Cin; ci++)
                memset(v + ((long)e * Cin + ci) * NT + (end - t0), 0,
                       sizeof(float) * (size_t)(NT - (end - t0)));
}

/* o[a][j] = (A^T M A)[a] + bias for the NT tiles of one channel, m[e*EM + j] = M[e] */
DAMEX_CLONES_AVX512
static void transform_output_row(float (*restrict o)[NT], const float *restrict m, float bias)
{
    const long EM = (long)CB * NT;
    for (int j = 0; j < NT; j++) {
        float s0[4], s1[4];
        for (int k = 0; k < 4; k++) { /* A^T M */
            s0[k] = m[(0 + k) * EM + j] + m[(4 + k) * EM + j] + m[(8 + k) * EM + j];
            s1[k] = m[(4 + k) * EM + j] - m[(8 + k) * EM + j] - m[(12 + k) * EM + j];
        }
        o[0][j] = s0[0] + s0[1] + s0[2] + bias; /* (A^T M) A */
        o[1][j] = s0[1] - s0[2] - s0[3] + bias;
        o[2][j] = s1[0] + s1[1] + s1[2] + bias;
        o[3][j] = s1[1] - s1[2] - s1[3] + bias;
    }
}

/* y tiles of channels co0 .. co0+rows from m[e][r][j] = M[e] of tile t0 + j,
 * cropped to Ho x Wo. */
static void transform_output(float *y, const float *m, const float *bias, int rows, int co0,
                             const struct conv2d_shape *s, int tw, long t0, long ntiles)
{
    const long P = (long)s->Ho * s->Wo;
    const long end = t0 + NT < ntiles ? t0 + NT : ntiles;
    float o[4][NT];
    for (int r = 0; r < rows; r++) {
        transform_output_row(o, m + (long)r * NT, bias[r]);
        float *yc = y + (long)(co0 + r) * P;
        for (long t = t0; t < end;) {
            long row = t / tw, col = t % tw, oh = 2 * row, ow = 2 * col;
            int n = (int)((tw - col) < end - t ? tw - col : end - t), j0 = (int)(t - t0);
            int full = n - (ow + 2L * n > s->Wo); /* tiles with both columns inside */
            int two_rows = oh + 1 < s->Ho;
            float *y0 = yc + oh * s->Wo + ow, *y1 = y0 + s->Wo;
            for (int j = 0; j < full; j++) {
                y0[2 * j] = o[0][j0 + j];
                y0[2 * j + 1] = o[1][j0 + j];
            }
            if (two_rows)
                for (int j = 0; j < full; j++) {
                    y1[2 * j] = o[2][j0 + j];
                    y1[2 * j + 1] = o[3][j0 + j];
                }
            if (full < n) { /* the last tile of the row has one column */
                y0[2 * full] = o[0][j0 + full];
                if (two_rows) y1[2 * full] = o[2][j0 + full];
            }
            t += n;
        }
    }
}

int conv2d_forward_winograd(float *y, const float *x, const float *w, const float *b,
                            const struct conv2d_shape *s)
{
    if (!conv2d_winograd_applies(s)) return DAMEX_EINVAL;
    if (s->N == 0) return DAMEX_OK;
    /* the padded image as two phase planes, its even and odd columns */
    struct conv2d_shape cols = *s;
    cols.sw = 2;
    const struct phases g = phases_of(&cols, s->N);
    const int Cin = s->Cin, Cout = s->Cout, ncb = (Cout + CB - 1) / CB;
    const int th = (s->Ho + 1) / 2, tw = (s->Wo + 1) / 2;
    const long ntiles = (long)th * tw, nblk = (ntiles + NT - 1) / NT;
    const long ys = (long)Cout * s->Ho * s->Wo;
    /* the last tiles of the last plane read up to one row past it */
    const long xq_n = 2 * g.PB + g.Wq + 16, up_n = 16L * ncb * Cin * CB;
    float *xq = malloc(sizeof(float) * (size_t)(xq_n + up_n + (long)ncb * CB));
    long *koff = malloc(sizeof(long) * (size_t)Cin);
    if (!xq || !koff) {
        free(xq);
        free(koff);
        return DAMEX_ENOMEM;
    }
    float *up = xq + xq_n, *bp = up + up_n;
    memset(xq + 2 * g.PB, 0, sizeof(float) * (size_t)(xq_n - 2 * g.PB));
    for (long co = 0; co < (long)ncb * CB; co++) bp[co] = co < Cout && b ? b[co] : 0.0f;
    for (int ci = 0; ci < Cin; ci++) koff[ci] = (long)ci * NT;
    const float zero[CB] = {0};
    const long planes = 2L * Cin * s->N, tasks = (long)s->N * nblk;
    int status = DAMEX_OK;
#pragma omp parallel if ((long)s->N * ntiles * Cout * Cin > PAR_MIN_WINOGRAD)
    {
#pragma omp for schedule(static) nowait
        for (int cb = 0; cb < ncb; cb++) transform_weights(up, w, cb, ncb, Cin, Cout);
#pragma omp for schedule(static)
        for (long q = 0; q < planes; q++) fill_phase_plane(xq, x, s->N, &cols, &g, q);
        float *v = malloc(sizeof(float) * (size_t)(16L * Cin * NT + 16L * CB * NT));
        if (!v) {
#pragma omp atomic write
            status = DAMEX_ENOMEM;
        }
#pragma omp for schedule(static)
        for (long k = 0; k < tasks; k++) {
            if (!v) continue;
            int n = (int)(k / nblk);
            long t0 = k % nblk * NT;
            float *m = v + 16L * Cin * NT;
            transform_input(v, xq + n * g.IS, &g, tw, t0, ntiles, Cin);
            for (int cb = 0; cb < ncb; cb++) {
                for (int e = 0; e < 16; e++)
                    conv_block_8x48(m + (long)e * CB * NT, v + (long)e * Cin * NT,
                                    up + ((long)e * ncb + cb) * Cin * CB, koff, Cin, zero);
                int rows = Cout - cb * CB < CB ? Cout - cb * CB : CB;
                transform_output(y + n * ys, m, bp + cb * CB, rows, cb * CB, s, tw, t0, ntiles);
            }
        }
        free(v);
    }
    free(xq);
    free(koff);
    return status;
}
