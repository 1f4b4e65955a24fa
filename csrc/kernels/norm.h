/* Normalisation layers: layer norm (last axis), group norm (NCHW) and the
 * frozen batch norm of detection backbones (NCHW, running statistics). */
#ifndef DAMEX_NORM_H
#define DAMEX_NORM_H

/* x[N,C] rows:  mean[n] = mean_c x,  rstd[n] = 1 / sqrt(var_c x + eps)  (biased var)
 *   y[n,c] = (x[n,c] - mean[n]) * rstd[n] * gamma[c] + beta[c] */
int layer_norm_forward(float *y, float *mean, float *rstd, const float *x, const float *gamma,
                       const float *beta, int N, int C, float eps);

/* Inverts  y = xhat * gamma + beta,  xhat = (x - mean) * rstd:
 *   dgamma[c] += sum_n dy xhat,   dbeta[c] += sum_n dy
 *   dx += rstd * (g - mean_c g - xhat * mean_c(g xhat)),   g = dy * gamma */
int layer_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                        const float *mean, const float *rstd, const float *gamma, int N, int C);

/* x[N,C,HW], G groups of C/G channels:  statistics over (C/G, HW) per (n, g):
 *   y[n,c,:] = (x[n,c,:] - mean[n,g]) * rstd[n,g] * gamma[c] + beta[c],  g = c / (C/G) */
int group_norm_forward(float *y, float *mean, float *rstd, const float *x, const float *gamma,
                       const float *beta, int N, int C, long HW, int G, float eps);

/* Inverts the line above; per (n, g) with M = (C/G) * HW elements:
 *   dx += rstd * (g - sum(g)/M - xhat * sum(g xhat)/M),  g = dy * gamma[c]
 *   dgamma[c] += sum_{n,hw} dy xhat,  dbeta[c] += sum_{n,hw} dy */
int group_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                        const float *mean, const float *rstd, const float *gamma, int N, int C,
                        long HW, int G);

/* x[N,C,HW]:  scale[c] = weight[c] / sqrt(running_var[c] + eps)
 *   y[n,c,:] = x[n,c,:] * scale[c] + (bias[c] - running_mean[c] * scale[c]) */
int frozen_batch_norm_forward(float *y, const float *x, const float *weight, const float *bias,
                              const float *running_mean, const float *running_var, int N, int C,
                              long HW, float eps);

/* Inverts  y = x * scale + shift:  dx += dy * scale[c]  (the statistics are frozen) */
int frozen_batch_norm_backward(float *dx, const float *dy, const float *weight,
                               const float *running_var, int N, int C, long HW, float eps);

#endif
