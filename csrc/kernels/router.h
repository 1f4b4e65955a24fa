/* The MoE router: logits, softmax, top-k, capacity slots, combine weights,
 * and the two backward steps (through the combine weights to the logits, and
 * through the router matmul).  See csrc/kernels/router.c and docs/ops.md. */
#ifndef DAMEX_ROUTER_H
#define DAMEX_ROUTER_H

#include <stdint.h>

/* How combine weights are normalised over the k selected experts. */
enum damex_router_normalize {
    DAMEX_NORM_NONE = 0,        /* w = p_e (V-MoE, DAMEX)                         */
    DAMEX_NORM_BEFORE_DROP = 1, /* w = p_e / sum over the k selected (Tutel, GShard) */
    DAMEX_NORM_AFTER_DROP = 2   /* w = p_e / sum over the kept choices             */
};

/* Outputs logits, noisy_logits, probs [T,E] float; expert_index, slot [T,k]
 * int64; combine_weight [T,k] float; expert_count, offset [E] int64.
 * Inputs x[T,D], noise[T,E] or NULL, mask[T] (nonzero = token) or NULL,
 * w_router[D,E].  capacity: slots per expert, -1 = unlimited (dropless).
 * bpr: fill slots in decreasing top-1 probability instead of token order.
 * Returns DAMEX_ENONFINITE (outputs partly written) if a logit or noisy logit
 * is NaN/inf, DAMEX_EINVAL for bad sizes, DAMEX_ENOMEM if scratch fails. */
int router_forward(float *logits, float *noisy_logits, float *probs, int64_t *expert_index,
                   float *combine_weight, int64_t *slot, int64_t *expert_count, int64_t *offset,
                   const float *x, const float *noise, const uint8_t *mask,
                   const float *w_router, int T, int D, int E, int k, long capacity, int bpr,
                   int normalize);

/* dlogits[T,E] += (d combine_weight / d logits)^T dcombine_weight[T,k]
 * (the same for clean and noisy logits).  A choice is kept iff slot >= 0.
 * Returns DAMEX_EINDEX if an expert index is outside [0, E). */
int router_backward(float *dlogits, const float *dcombine_weight, const float *probs,
                    const int64_t *expert_index, const int64_t *slot, int T, int E, int k,
                    int normalize);

/* dx[T,D] += dlogits @ w_router^T;  dw_router[D,E] += x^T @ dlogits. */
int router_logits_backward(float *dx, float *dw_router, const float *dlogits, const float *x,
                           const float *w_router, int T, int D, int E);

#endif
