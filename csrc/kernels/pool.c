/* 2-D max pooling forward and backward (see pool.h). */
#include "pool.h"

#include <math.h>

#include "parallel.h"
#include "status.h"

long maxpool2d_out_size(long in, int k, int stride, int pad)
{
    if (in < 1 || k < 1 || stride < 1 || pad < 0 || 2 * pad > k) return -1;
    long span = in + 2L * pad - k;
    if (span < 0) return -1;
    return span / stride + 1;
}

/* One plane: y[Ho,Wo], idx[Ho,Wo] from x[H,W]. */
static void pool_plane(float *y, int64_t *idx, const float *x, int H, int W, int Ho, int Wo,
                       int kh, int kw, int sh, int sw, int ph, int pw)
{
    for (int oh = 0; oh < Ho; oh++) {
        int h0 = oh * sh - ph, h1 = h0 + kh;
        if (h0 < 0) h0 = 0;
        if (h1 > H) h1 = H;
        for (int ow = 0; ow < Wo; ow++) {
            int w0 = ow * sw - pw, w1 = w0 + kw;
            if (w0 < 0) w0 = 0;
            if (w1 > W) w1 = W;
            float best = -INFINITY;
            int64_t at = (int64_t)h0 * W + w0;
            for (int h = h0; h < h1; h++) {
                for (int w = w0; w < w1; w++) {
                    float v = x[(int64_t)h * W + w];
                    if (v > best || isnan(v)) {   /* first maximum; NaN wins (torch) */
                        best = v;
                        at = (int64_t)h * W + w;
                    }
                }
            }
            y[(int64_t)oh * Wo + ow] = best;
            idx[(int64_t)oh * Wo + ow] = at;
        }
    }
}

int maxpool2d_forward(float *y, int64_t *idx, const float *x, long NC, int H, int W, int kh,
                      int kw, int sh, int sw, int ph, int pw)
{
    long Ho = maxpool2d_out_size(H, kh, sh, ph), Wo = maxpool2d_out_size(W, kw, sw, pw);
    if (NC < 0 || Ho < 0 || Wo < 0) return DAMEX_EINVAL;
    int64_t in_plane = (int64_t)H * W, out_plane = (int64_t)Ho * Wo;
#pragma omp parallel for schedule(static) if (NC * out_plane * kh * kw > PAR_MIN_POOL)
    for (long p = 0; p < NC; p++)
        pool_plane(y + p * out_plane, idx + p * out_plane, x + p * in_plane, H, W, (int)Ho,
                   (int)Wo, kh, kw, sh, sw, ph, pw);
    return DAMEX_OK;
}

int maxpool2d_backward(float *dx, const float *dy, const int64_t *idx, long NC, int H, int W,
                       int Ho, int Wo)
{
    if (NC < 0 || H < 0 || W < 0 || Ho < 0 || Wo < 0) return DAMEX_EINVAL;
    int64_t in_plane = (int64_t)H * W, out_plane = (int64_t)Ho * Wo;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (NC * out_plane > PAR_MIN_POOL)
    for (long p = 0; p < NC; p++) {
        float *dxp = dx + p * in_plane;
        const float *dyp = dy + p * out_plane;
        const int64_t *ip = idx + p * out_plane;
        for (int64_t o = 0; o < out_plane; o++) {
            int64_t i = ip[o];
            if (i < 0 || i >= in_plane) {
                bad = 1;
                continue;
            }
            dxp[i] += dyp[o];
        }
    }
    return bad ? DAMEX_EINDEX : DAMEX_OK;
}
