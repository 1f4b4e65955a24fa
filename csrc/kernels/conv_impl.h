/* Internal to the conv2d kernels: the four algorithms behind conv.c and
 * conv_backward.c, the phase planes they share, and the column ranges. */
#ifndef DAMEX_CONV_IMPL_H
#define DAMEX_CONV_IMPL_H

#include "conv.h"
#include "cpu.h"

/* The indices c >= 0 with 0 <= c*step + off < n, as [*lo, *hi) (*hi >= *lo; empty
 * when none qualifies).  Where padding and stride leave a phase, a column or a
 * tap past the image, n - off is negative: C's division truncates that toward
 * zero, so it is handled before dividing (a truncated bound read past the row).
 * The one home of this range for im2col, the phase planes and conv_dx. */
static inline void conv_span(long n, long off, int step, long *lo, long *hi)
{
    long l = off < 0 ? (-off + step - 1) / step : 0;
    long h = n - off > 0 ? (n - off + step - 1) / step : 0;
    *lo = l;
    *hi = h > l ? h : l;
}

/* The algorithm a call runs (never AUTO), and whether AUTO runs damex's own
 * kernels (AVX-512 and output planes of CONV2D_OWN_MIN_PIXELS+); conv.c. */
int conv2d_algorithm_of(const struct conv2d_shape *s, int forward);
int conv2d_own_kernels(const struct conv2d_shape *s);

/* 1x1, stride 1, no padding: the image itself is the column matrix. */
int conv2d_is_pointwise(const struct conv2d_shape *s);

int conv2d_forward_im2col(float *y, const float *x, const float *w, const float *b,
                          const struct conv2d_shape *s);
int conv2d_backward_im2col(float *dx, float *dw, const float *dy, const float *x,
                           const float *w, const struct conv2d_shape *s);
/* The register-blocked kernel of the direct and Winograd algorithms:
 *   yb[r*48 + c] = bias[r] + sum_{k<K} wb[k*8 + r] * xb[koff[k] + c]   (r < 8, c < 48)
 * 24 accumulators of 16 floats; compiled for AVX-512 and for the baseline. */
#define CONV_BLOCK_ROWS 8
#define CONV_BLOCK_COLS 48
/* 16 floats (a zmm register with AVX-512), and the same for unaligned access */
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4), may_alias));
void conv_block_8x48(float *restrict yb, const float *restrict xb, const float *restrict wb,
                     const long *restrict koff, int K, const float *restrict bias);

/* 1 where the CPU runs the direct kernel at full width (AVX-512). */
int conv2d_direct_preferred(void);
int conv2d_forward_direct(float *y, const float *x, const float *w, const float *b,
                          const struct conv2d_shape *s);
/* dw[Cout, Cin*kh*kw] += the weight gradient (conv_dw.c). */
/* dx += the input gradient, computed as forward convolutions of dy (conv_dx.c). */
int conv2d_dx_by_forward(float *dx, const float *dy, const float *w, const struct conv2d_shape *s);
int conv2d_dw_direct(float *dw, const float *dy, const float *x, const struct conv2d_shape *s);
/* 1 for a 3x3 stride-1 conv. */
int conv2d_winograd_applies(const struct conv2d_shape *s);
int conv2d_forward_winograd(float *y, const float *x, const float *w, const float *b,
                            const struct conv2d_shape *s);
int conv2d_forward_shifted(float *y, const float *x, const float *w, const float *b,
                           const struct conv2d_shape *s);
int conv2d_backward_shifted(float *dx, float *dw, const float *dy, const float *x,
                            const float *w, const struct conv2d_shape *s);

/* Phase planes (conv_phases.c).  The zero-padded image (Hp = H + 2ph,
 * Wp = W + 2pw) is split into sh*sw phase planes,
 * xq[a][b][ci][img][r][c] = xpad[img][ci][r*sh + a][c*sw + b], of Hq = ceil(Hp/sh)
 * rows of Wq = ceil(Wp/sw) (plus one spare row), the nb images of a chunk side by
 * side.  Tap (i, j) = (qi*sh + a, qj*sw + b) reads phase (a, b) shifted by
 * (qi, qj): a row-major [Cin, Ho*Wq] matrix at tap_offset with row stride CS,
 * whose columns ow >= Wo (and rows oh >= Ho) are garbage to crop. */
struct phases {
    int Hq, Wq, T, nph, nb; /* phase rows/cols, taps kh*kw, phases sh*sw, images per chunk */
    long IS, CS, PB;        /* image block (Hq+1)*Wq, channel stride nb*IS, phase block Cin*CS */
};

struct phases phases_of(const struct conv2d_shape *s, int nb);
/* Columns of the per-tap products for a chunk of `cnt` images. */
long chunk_columns(const struct conv2d_shape *s, const struct phases *g, int cnt);
long tap_offset(const struct conv2d_shape *s, const struct phases *g, int t);
void fill_phases(float *xq, const float *x, int cnt, const struct conv2d_shape *s,
                 const struct phases *g);
void fill_phase_plane(float *xq, const float *x, int cnt, const struct conv2d_shape *s,
                      const struct phases *g, long q);
void unfill_phases_accumulate(float *dx, const float *dxq, int cnt,
                              const struct conv2d_shape *s, const struct phases *g);

#endif
