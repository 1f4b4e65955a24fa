/* 2-D max pooling over NCHW float32 planes, as torch.nn.functional.max_pool2d
 * (dilation 1, floor mode): padding counts as -inf, every window holds at least
 * one real element (padding <= kernel / 2), the saved index of an output is the
 * flat position h * W + w of its maximum inside the input plane.  Ties go to the
 * first maximum in row-major scan order of the window and NaN propagates (the
 * last NaN of a window wins), exactly as PyTorch's CPU kernel. */
#ifndef DAMEX_POOL_H
#define DAMEX_POOL_H

#include <stdint.h>

/* Output extent of one axis: (in + 2 pad - k) / stride + 1, or -1 if the
 * arguments are invalid (k, stride >= 1, 0 <= pad <= k / 2, output >= 1). */
long maxpool2d_out_size(long in, int k, int stride, int pad);

/* y[N,C,Ho,Wo], idx[N,C,Ho,Wo] = max_pool2d(x[N,C,H,W]); kernel kh x kw, stride sh, sw,
 * padding ph, pw (NC = N * C planes, OpenMP over planes) */
int maxpool2d_forward(float *y, int64_t *idx, const float *x, long NC, int H, int W, int kh,
                      int kw, int sh, int sw, int ph, int pw);

/* dx[N,C,H,W] += scatter of dy[N,C,Ho,Wo] to the saved positions idx[N,C,Ho,Wo]
 * (DAMEX_EINDEX if an index is outside [0, H * W)) */
int maxpool2d_backward(float *dx, const float *dy, const int64_t *idx, long NC, int H, int W,
                       int Ho, int Wo);

#endif
