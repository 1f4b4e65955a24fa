/* The MoE core after routing: dispatch (gather token rows into a buffer packed
 * by expert), the expert FFN over all experts, and combine (weighted
 * scatter-add back to tokens), each with its backward.
 *
 * Routing is described by three int64 arrays from the router:
 *   expert_index[T,k]  expert of choice (t,j)
 *   slot[T,k]          row of the token within its expert's packed rows, -1 = dropped/masked
 *   expert_count[E]    kept rows per expert; N = sum(expert_count)
 * The packed row of a kept choice is row(t,j) = offset[e] + slot[t,j] with
 * offset the exclusive cumsum of expert_count.  Every kernel checks that each
 * kept choice lands in its expert's range and that the kept choices cover the
 * N rows exactly once (DAMEX_EINDEX otherwise), so no input can make it write
 * out of bounds. */
#ifndef DAMEX_MOE_H
#define DAMEX_MOE_H

#include <stdint.h>

/* xe[row(t,j), :] = x[t, :]  for every kept choice.
 * xe[N,D], x[T,D]. */
int dispatch_forward(float *xe, const float *x, const int64_t *expert_index, const int64_t *slot,
                     const int64_t *expert_count, int T, int k, int D, int E, long N);

/* inverts "xe[row(t,j)] = x[t]":  dx[t] += sum_{kept j} dxe[row(t,j)].
 * dx[T,D], dxe[N,D]. */
int dispatch_backward(float *dx, const float *dxe, const int64_t *expert_index,
                      const int64_t *slot, const int64_t *expert_count, int T, int k, int D,
                      int E, long N);

/* Expert e owns the packed rows [offset[e], offset[e] + expert_count[e]):
 *   h  = xe @ w1[e] + b1[e]        h[N,F]  (pre-activation, saved)
 *   a  = act(h)                     a[N,F]  (saved)
 *   ye = a @ w2[e] + b2[e]          ye[N,D]
 * w1[E,D,F], b1[E,F], w2[E,F,D], b2[E,D]; act as in activation.h. */
int expert_ffn_forward(float *ye, float *h, float *a, const float *xe, const float *w1,
                       const float *b1, const float *w2, const float *b2,
                       const int64_t *expert_count, int E, int D, int F, long N, int act);

/* inverts "h = xe @ w1[e] + b1[e]; a = act(h); ye = a @ w2[e] + b2[e]":
 *   dw2[e] += a^T @ dy          db2[e] += sum_rows dy
 *   dh      = (dy @ w2[e]^T) * act'(h)
 *   dw1[e] += xe^T @ dh          db1[e] += sum_rows dh
 *   dxe    += dh @ w1[e]^T
 * (the += above are over the rows of each expert).  Every output is
 * overwritten (no zeroed buffers needed: zeroing 24 MB of gradients cost
 * more than 5% of a T=4096 layer); dh[N,F] is scratch, passed in so the
 * caller can reuse one large buffer. */
int expert_ffn_backward(float *dxe, float *dw1, float *db1, float *dw2, float *db2, float *dh,
                        const float *dy, const float *xe, const float *h, const float *a,
                        const float *w1, const float *w2, const int64_t *expert_count, int E,
                        int D, int F, long N, int act);

/* y[t, :] = sum_{kept j} combine_weight[t,j] * ye[row(t,j), :]   (overwrites y)
 * y[T,D], ye[N,D], combine_weight[T,k]. */
int combine_forward(float *y, const float *ye, const float *combine_weight,
                    const int64_t *expert_index, const int64_t *slot, const int64_t *expert_count,
                    int T, int k, int D, int E, long N);

/* inverts "y[t] = sum_j w[t,j] * ye[row(t,j)]":
 *   dye[row(t,j)]            += w[t,j] * dy[t]
 *   dcombine_weight[t,j]     += <dy[t], ye[row(t,j)]>      (kept choices only)
 * dye[N,D], dcombine_weight[T,k], dy[T,D]. */
int combine_backward(float *dye, float *dcombine_weight, const float *dy, const float *ye,
                     const float *combine_weight, const int64_t *expert_index,
                     const int64_t *slot, const int64_t *expert_count, int T, int k, int D,
                     int E, long N);

#endif
