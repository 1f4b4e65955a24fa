/* conv2d: shape checks, the choice of algorithm, and the forward pass.
 * Calls go one way: conv_backward.c -> conv_dx.c -> this file. */
#include "conv_impl.h"

#include <stddef.h>

#include "status.h"

int conv2d_shape_init(struct conv2d_shape *s)
{
    if (s->N < 0 || s->Cin <= 0 || s->H <= 0 || s->W <= 0 || s->Cout <= 0 || s->kh <= 0 ||
        s->kw <= 0 || s->sh <= 0 || s->sw <= 0 || s->ph < 0 || s->pw < 0)
        return DAMEX_EINVAL;
    long eh = (long)s->H + 2L * s->ph - s->kh, ew = (long)s->W + 2L * s->pw - s->kw;
    if (eh < 0 || ew < 0) return DAMEX_EINVAL;
    s->Ho = (int)(eh / s->sh + 1);
    s->Wo = (int)(ew / s->sw + 1);
    if ((long)s->Cin * s->kh * s->kw > 2147483647L || (long)s->Ho * s->Wo > 2147483647L)
        return DAMEX_EINVAL;
    return DAMEX_OK;
}

/* Where AUTO runs damex's own kernels: a CPU with AVX-512 and output planes
 * of CONV2D_OWN_MIN_PIXELS or more.  Their blocks are 48 columns (pixels or
 * Winograd tiles) of one image, so smaller planes leave most of a block
 * empty: at 2x3 outputs a 3x3 conv ran 3x slower than OpenBLAS's products. */
int conv2d_own_kernels(const struct conv2d_shape *s)
{
    return (long)s->Ho * s->Wo >= CONV2D_OWN_MIN_PIXELS && conv2d_direct_preferred();
}

/* The algorithm a call runs (never AUTO). */
int conv2d_algorithm_of(const struct conv2d_shape *s, int forward)
{
    int a = s->algorithm;
    if ((a == CONV2D_DIRECT || a == CONV2D_WINOGRAD) && !forward) return CONV2D_SHIFTED;
    if (a != CONV2D_AUTO) return a;
    if (conv2d_is_pointwise(s)) return CONV2D_IM2COL;
    if (forward && conv2d_own_kernels(s))
        return conv2d_winograd_applies(s) && s->Cin >= CONV2D_WINOGRAD_MIN_CIN ? CONV2D_WINOGRAD
                                                                              : CONV2D_DIRECT;
    return s->Cin >= CONV2D_SHIFTED_MIN_CIN ? CONV2D_SHIFTED : CONV2D_IM2COL;
}

int conv2d_forward(float *y, const float *x, const float *w, const float *b,
                   const struct conv2d_shape *s)
{
    if (s->algorithm < CONV2D_AUTO || s->algorithm > CONV2D_WINOGRAD) return DAMEX_EINVAL;
    switch (conv2d_algorithm_of(s, 1)) {
    case CONV2D_WINOGRAD: return conv2d_forward_winograd(y, x, w, b, s);
    case CONV2D_DIRECT: return conv2d_forward_direct(y, x, w, b, s);
    case CONV2D_SHIFTED: return conv2d_forward_shifted(y, x, w, b, s);
    default: return conv2d_forward_im2col(y, x, w, b, s);
    }
}

