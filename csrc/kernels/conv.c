/* conv2d: shape checks, the choice of algorithm, and the bias gradient. */
#include "conv_impl.h"

#include "reduce.h"
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

static int use_shifted(const struct conv2d_shape *s)
{
    if (s->algorithm == CONV2D_SHIFTED) return 1;
    if (s->algorithm == CONV2D_IM2COL) return 0;
    return s->Cin >= CONV2D_SHIFTED_MIN_CIN && !conv2d_is_pointwise(s);
}

int conv2d_forward(float *y, const float *x, const float *w, const float *b,
                   const struct conv2d_shape *s)
{
    if (s->algorithm < CONV2D_AUTO || s->algorithm > CONV2D_SHIFTED) return DAMEX_EINVAL;
    return use_shifted(s) ? conv2d_forward_shifted(y, x, w, b, s)
                          : conv2d_forward_im2col(y, x, w, b, s);
}

int conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, const struct conv2d_shape *s)
{
    if (s->algorithm < CONV2D_AUTO || s->algorithm > CONV2D_SHIFTED) return DAMEX_EINVAL;
    const long P = (long)s->Ho * s->Wo, ys = (long)s->Cout * P;
    if (db) {
        /* db[co] += sum_{n,p} dy[n,co,p]      (inverts y += b) */
#pragma omp parallel for schedule(static) if ((long)s->N * ys > CONV_PAR_MIN)
        for (int co = 0; co < s->Cout; co++) {
            double t = 0.0;
            for (int n = 0; n < s->N; n++) t += dx_sum(dy + n * ys + (long)co * P, P);
            db[co] += (float)t;
        }
    }
    if (!dx && !dw) return DAMEX_OK;
    return use_shifted(s) ? conv2d_backward_shifted(dx, dw, dy, x, w, s)
                          : conv2d_backward_im2col(dx, dw, dy, x, w, s);
}
