/* Optimizer kernels: the AdamW update (PyTorch torch.optim.AdamW semantics)
 * and the sum of squares behind global gradient-norm clipping. */
#ifndef DAMEX_OPTIM_H
#define DAMEX_OPTIM_H

/* One AdamW step on n parameters, in place on param, exp_avg, exp_avg_sq;
 * step >= 1 counts this step (bias corrections use it). */
int adamw_step(float *param, float *exp_avg, float *exp_avg_sq, const float *grad, long n,
               long step, double lr, double beta1, double beta2, double eps, double weight_decay);

/* *out = sum_i x[i]^2 in double, in a fixed order (independent of threads) */
int sum_of_squares(double *out, const float *x, long n);

#endif
