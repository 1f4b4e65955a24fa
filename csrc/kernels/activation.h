/* Elementwise activations, forward and backward, on n contiguous floats.
 * Also used inside the fused expert FFN (moe.c). */
#ifndef DAMEX_ACTIVATION_H
#define DAMEX_ACTIVATION_H

enum damex_activation { DAMEX_ACT_GELU_TANH = 0, DAMEX_ACT_GELU_ERF = 1, DAMEX_ACT_RELU = 2 };

/* y[n] = act(x[n]) */
int activation_forward(float *y, const float *x, long n, int act);

/* dx[n] += dy[n] * act'(x[n])   (inverts y = act(x)) */
int activation_backward(float *dx, const float *dy, const float *x, long n, int act);

#endif
