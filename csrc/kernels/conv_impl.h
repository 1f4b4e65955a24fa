/* Internal to the conv2d kernels: the two algorithms behind conv.c. */
#ifndef DAMEX_CONV_IMPL_H
#define DAMEX_CONV_IMPL_H

#include "conv.h"

/* Element count from which the copies around the products (im2col, phase
 * fills, crops, bias sums) fork OpenMP threads.  They are memory-bound and
 * short, and a forked team keeps spinning into the sgemm that follows,
 * contending with OpenBLAS's own threads: on a loaded 2-core machine that
 * made the 2-thread conv several times slower than 1 thread.  Only copies of
 * several MB (large images) are worth a team. */
#ifndef CONV_PAR_MIN
#define CONV_PAR_MIN (1L << 21)
#endif

/* 1x1, stride 1, no padding: the image itself is the column matrix. */
int conv2d_is_pointwise(const struct conv2d_shape *s);

int conv2d_forward_im2col(float *y, const float *x, const float *w, const float *b,
                          const struct conv2d_shape *s);
int conv2d_backward_im2col(float *dx, float *dw, const float *dy, const float *x,
                           const float *w, const struct conv2d_shape *s);
int conv2d_forward_shifted(float *y, const float *x, const float *w, const float *b,
                           const struct conv2d_shape *s);
int conv2d_backward_shifted(float *dx, float *dw, const float *dy, const float *x,
                            const float *w, const struct conv2d_shape *s);

#endif
