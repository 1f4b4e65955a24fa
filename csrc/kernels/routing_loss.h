/* Auxiliary routing losses on the router logits g[T,E] of one MoE layer:
 * V-MoE importance and load, Switch/GShard balance, ST-MoE router z-loss and
 * the DAMEX dataset-to-expert cross-entropy.
 *
 * Every forward writes one double (the loss); every backward *accumulates*
 * dy * dL/dg into dlogits[T,E] (zeroed by the caller).  mask[T] (uint8,
 * 0 = padding) may be NULL (every token counts); a padding token takes no
 * part in any sum, mean or count and gets no gradient.  With no unmasked
 * token every loss is 0 and its gradient is 0.  Sums over tokens run in
 * fixed blocks of tokens, reduced in block order: the result does not depend
 * on the number of threads. */
#ifndef DAMEX_ROUTING_LOSS_H
#define DAMEX_ROUTING_LOSS_H

#include <stdint.h>

enum damex_variance { DAMEX_VAR_POPULATION = 0, DAMEX_VAR_UNBIASED = 1 };
enum damex_switch_counts { DAMEX_COUNTS_TOP1 = 0, DAMEX_COUNTS_TOPK = 1 };

/* Imp_i = sum_x q_i(x), q = softmax(g (+ noise)); L = var(Imp) / mean(Imp)^2.
 * noise[T,E] may be NULL (clean probabilities). */
int importance_loss_forward(double *loss, const float *logits, const float *noise,
                            const uint8_t *mask, int T, int E, int variance);
int importance_loss_backward(float *dlogits, double dy, const float *logits,
                             const float *noise, const uint8_t *mask, int T, int E, int variance);

/* eta_k(x) = k-th largest of g~ = g + noise; P_i = 1 - Phi((eta_k - g_i) / sigma);
 * Load_i = sum_x P_i(x); L = var(Load) / mean(Load)^2.  sigma > 0, 1 <= k <= E. */
int load_loss_forward(double *loss, const float *logits, const float *noise,
                      const uint8_t *mask, int T, int E, int k, double sigma, int variance);
int load_loss_backward(float *dlogits, double dy, const float *logits, const float *noise,
                       const uint8_t *mask, int T, int E, int k, double sigma, int variance);

/* L = E * sum_i f_i * mean_x q_i(x); f_i = share of tokens whose top-1 is i
 * (counts = TOP1) or share of all top-k choices that are i (TOPK). */
int switch_loss_forward(double *loss, const float *logits, const uint8_t *mask, int T, int E,
                        int k, int counts);
int switch_loss_backward(float *dlogits, double dy, const float *logits, const uint8_t *mask,
                         int T, int E, int k, int counts);

/* L = mean_x (logsumexp_i g_i(x))^2 */
int z_loss_forward(double *loss, const float *logits, const uint8_t *mask, int T, int E);
int z_loss_backward(float *dlogits, double dy, const float *logits, const uint8_t *mask, int T,
                    int E);

/* L = -mean_x log q_{target(x)}(x); target of an unmasked token in [0, E). */
int damex_loss_forward(double *loss, const float *logits, const int64_t *expert_target,
                       const uint8_t *mask, int T, int E);
int damex_loss_backward(float *dlogits, double dy, const float *logits,
                        const int64_t *expert_target, const uint8_t *mask, int T, int E);

#endif
