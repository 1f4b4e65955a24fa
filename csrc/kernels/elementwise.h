/* Elementwise ops of the detector on n contiguous floats: sigmoid, DINO's
 * inverse sigmoid, and dropout with a counter-based RNG. */
#ifndef DAMEX_ELEMENTWISE_H
#define DAMEX_ELEMENTWISE_H

#include <stdint.h>

/* y = 1 / (1 + exp(-x)) */
int sigmoid_forward(float *y, const float *x, long n);

/* Inverts y = 1 / (1 + exp(-x)):  dx += dy * y * (1 - y) */
int sigmoid_backward(float *dx, const float *dy, const float *y, long n);

/* v = clamp(x, 0, 1);  y = log(max(v, eps) / max(1 - v, eps)) */
int inverse_sigmoid_forward(float *y, const float *x, long n, float eps);

/* Inverts the line above, with PyTorch's clamp gradient (passes where lo <= v <= hi):
 *   dx += dy * [0 <= x <= 1] * ([v >= eps] / max(v, eps) + [1 - v >= eps] / max(1 - v, eps)) */
int inverse_sigmoid_backward(float *dx, const float *dy, const float *x, long n, float eps);

/* keep[i] = bits(seed, i) >= p * 2^24  with bits = top 24 bits of splitmix64(seed + (i+1) golden)
 *   y[i] = keep[i] ? x[i] / (1 - p) : 0      (p = 1: all dropped, y = 0) */
int dropout_forward(float *y, uint8_t *keep, const float *x, long n, float p, uint64_t seed);

/* Inverts y = keep * x / (1 - p):  dx += keep ? dy / (1 - p) : 0 */
int dropout_backward(float *dx, const float *dy, const uint8_t *keep, long n, float p);

#endif
