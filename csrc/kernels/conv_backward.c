/* conv2d backward: the bias gradient and the choice of the dx/dw kernels.
 * It calls conv_dx.c, which calls conv2d_forward (conv.c): one way. */
#include "conv_impl.h"

#include <stddef.h>

#include "parallel.h"
#include "reduce.h"
#include "status.h"

/* AUTO's backward where own_kernels holds: dw by damex's own kernel
 * (conv_dw.c), dx as forward convolutions (conv_dx.c) when Cin >= DX_MIN_CIN.
 * Those convolutions output Cin channels: a few (an RGB stem) would leave most
 * of the direct kernel's 8 rows empty, so dx then runs on the products. */
#define DX_MIN_CIN 8

static int direct_backward(const struct conv2d_shape *s)
{
    return s->algorithm == CONV2D_AUTO && !conv2d_is_pointwise(s) && conv2d_own_kernels(s);
}

int conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, const struct conv2d_shape *s)
{
    if (s->algorithm < CONV2D_AUTO || s->algorithm > CONV2D_WINOGRAD) return DAMEX_EINVAL;
    const long P = (long)s->Ho * s->Wo, ys = (long)s->Cout * P;
    if (db) {
        /* db[co] += sum_{n,p} dy[n,co,p]      (inverts y += b) */
#pragma omp parallel for schedule(static) if ((long)s->N * ys > PAR_MIN_CONV_COPY)
        for (int co = 0; co < s->Cout; co++) {
            double t = 0.0;
            for (int n = 0; n < s->N; n++) t += dx_sum(dy + n * ys + (long)co * P, P);
            db[co] += (float)t;
        }
    }
    if (!dx && !dw) return DAMEX_OK;
    if (direct_backward(s)) {
        int status = dw ? conv2d_dw_direct(dw, dy, x, s) : DAMEX_OK;
        if (status != DAMEX_OK || !dx) return status;
        if (s->Cin >= DX_MIN_CIN) return conv2d_dx_by_forward(dx, dy, w, s);
        dw = NULL;
    }
    return conv2d_algorithm_of(s, 0) == CONV2D_SHIFTED ? conv2d_backward_shifted(dx, dw, dy, x, w, s)
                                                : conv2d_backward_im2col(dx, dw, dy, x, w, s);
}
