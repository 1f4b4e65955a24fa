/* Softmax over the last axis of x[R, C]. */
#ifndef DAMEX_SOFTMAX_H
#define DAMEX_SOFTMAX_H

/* y[r,c] = exp(x[r,c] - max_c x[r,:]) / sum_c exp(x[r,c] - max_c x[r,:]) */
int softmax_forward(float *y, const float *x, long R, long C);

/* Inverts the line above:  dx[r,c] += y[r,c] * (dy[r,c] - sum_c' dy[r,c'] y[r,c']) */
int softmax_backward(float *dx, const float *dy, const float *y, long R, long C);

#endif
