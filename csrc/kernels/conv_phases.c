/* The phase planes shared by the shifted and direct conv2d algorithms (see
 * conv_impl.h for the layout). */
#include "conv_impl.h"

#include <string.h>

#include "parallel.h"
#include "cpu.h"

struct phases phases_of(const struct conv2d_shape *s, int nb)
{
    struct phases g;
    g.Hq = (s->H + 2 * s->ph + s->sh - 1) / s->sh;
    g.Wq = (s->W + 2 * s->pw + s->sw - 1) / s->sw;
    g.T = s->kh * s->kw;
    g.nph = s->sh * s->sw;
    g.IS = (long)(g.Hq + 1) * g.Wq;
    g.nb = nb;
    g.CS = g.nb * g.IS;
    g.PB = (long)s->Cin * g.CS;
    return g;
}

/* Columns of the products for a chunk of `cnt` images: the last image's rows stop at Ho. */
long chunk_columns(const struct conv2d_shape *s, const struct phases *g, int cnt)
{
    return (long)(cnt - 1) * g->IS + (long)s->Ho * g->Wq;
}

/* Offset in xq of tap t = (i, j): phase (i % sh, j % sw), shifted by (i / sh, j / sw). */
long tap_offset(const struct conv2d_shape *s, const struct phases *g, int t)
{
    int i = t / s->kw, j = t % s->kw;
    return (long)((i % s->sh) * s->sw + j % s->sw) * g->PB + (long)(i / s->sh) * g->Wq + j / s->sw;
}

/* Plane q = (phase, ci, img) of fill_phases, so that a caller's own parallel
 * region can share the planes out. */
DAMEX_CLONES
void fill_phase_plane(float *xq, const float *x, int cnt, const struct conv2d_shape *s,
                      const struct phases *g, long q)
{
    int img = (int)(q % cnt), ci = (int)(q / cnt % s->Cin), ph_i = (int)(q / cnt / s->Cin);
    int a = ph_i / s->sw, b = ph_i % s->sw;
    float *dst = xq + ph_i * g->PB + (long)ci * g->CS + (long)img * g->IS;
    const float *src = x + ((long)img * s->Cin + ci) * s->H * s->W;
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
        /* columns c with 0 <= c*sw + b - pw < W are [lo, hi); zeros around them */
        long lo, hi;
        conv_span(s->W, b - s->pw, s->sw, &lo, &hi);
        lo = lo < g->Wq ? lo : g->Wq;
        hi = hi < g->Wq ? hi : g->Wq;
        for (long c = 0; c < lo; c++) row[c] = 0.0f;
        const long off = b - s->pw;
        if (s->sw == 2) /* a constant stride, which the compiler vectorises */
            for (long c = lo; c < hi; c++) row[c] = in[2 * c + off];
        else
            for (long c = lo; c < hi; c++) row[c] = in[c * s->sw + off];
        for (long c = hi; c < g->Wq; c++) row[c] = 0.0f;
    }
}

/* xq[a][b][ci][img][r][c] = x[img][ci][r*sh + a - ph][c*sw + b - pw]  (0 outside the image) */
void fill_phases(float *xq, const float *x, int cnt, const struct conv2d_shape *s,
                 const struct phases *g)
{
    const long planes = (long)g->nph * s->Cin * cnt;
#pragma omp parallel for schedule(static) if (planes * g->IS > PAR_MIN_CONV_COPY)
    for (long q = 0; q < planes; q++) fill_phase_plane(xq, x, cnt, s, g, q);
}

/* Inverts fill_phases:
 *   dx[img][ci][r][c] += dxq[(r+ph) % sh][(c+pw) % sw][ci][img][(r+ph)/sh][(c+pw)/sw] */
void unfill_phases_accumulate(float *dx, const float *dxq, int cnt,
                              const struct conv2d_shape *s, const struct phases *g)
{
    const long planes = (long)s->Cin * cnt;
#pragma omp parallel for schedule(static) if (planes * s->H * s->W > PAR_MIN_CONV_COPY)
    for (long q = 0; q < planes; q++) {
        int img = (int)(q / s->Cin), ci = (int)(q % s->Cin);
        const float *base = dxq + (long)ci * g->CS + (long)img * g->IS;
        for (int r = 0; r < s->H; r++) {
            int pr = r + s->ph, a = pr % s->sh, qr = pr / s->sh;
            float *out = dx + (q * s->H + r) * s->W;
            for (int c = 0; c < s->W; c++) {
                int pc = c + s->pw, b = pc % s->sw;
                out[c] += base[(long)(a * s->sw + b) * g->PB + (long)qr * g->Wq + pc / s->sw];
            }
        }
    }
}
