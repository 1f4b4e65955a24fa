/* MoE router (SPEC section 2).
 *
 *   logits = x @ w_router                  g[t,e]
 *   noisy  = logits + noise                g~[t,e]   (noise drawn by the caller)
 *   probs  = softmax(noisy) over e         p[t,e]
 *   expert_index[t,:] = the k largest p[t,:], descending, ties to the lower index
 *     (compared on g~, which softmax maps monotonically: no float32 rounding of p
 *     can reorder or merge two different logits)
 *   slots: round r = 0..k-1, tokens in order (token order, or with bpr by
 *     decreasing p[t, expert_index[t,0]], stable), each unmasked token's r-th
 *     choice takes the next free slot of its expert if fewer than `capacity`
 *     are taken, else it is dropped (slot -1)
 *   combine_weight[t,r] = kept[t,r] * p[t,e_r] / S[t],   S = 1 (none),
 *     sum_{r'} p[t,e_r'] (before_drop), sum_{kept r'} p[t,e_r'] (after_drop)
 */
#include "router.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "fastmath.h"
#include "status.h"

/* idx[0..k) = top-k of g[0..E) in the order (descending value, ascending index).
 * The r-th choice is the largest (value, -index) strictly below the (r-1)-th:
 * O(kE), no scratch.  g must be finite. */
static void topk_row(int64_t *idx, const float *g, int E, int k)
{
    float prev_v = INFINITY;
    int prev_i = -1;
    for (int r = 0; r < k; r++) {
        int best = -1;
        float best_v = 0.0f;
        for (int j = 0; j < E; j++) {
            float v = g[j];
            int below_prev = v < prev_v || (v == prev_v && j > prev_i);
            if (below_prev && (best < 0 || v > best_v)) {
                best = j;
                best_v = v;
            }
        }
        idx[r] = best;
        prev_v = best_v;
        prev_i = best;
    }
}

/* Sorts order[0..n) stably by ascending key (LSD radix, 8-bit digits; a digit
 * that is equal for every key is skipped).  tmp, ktmp: n-element scratch. */
static void radix_sort_stable(int32_t *order, uint32_t *key, int32_t *tmp, uint32_t *ktmp, int n)
{
    int32_t *src = order, *dst = tmp;
    uint32_t *ksrc = key, *kdst = ktmp;
    for (int shift = 0; shift < 32; shift += 8) {
        int hist[256] = {0};
        for (int i = 0; i < n; i++) hist[(ksrc[i] >> shift) & 255]++;
        if (hist[(ksrc[0] >> shift) & 255] == n) continue;
        int pos = 0;
        for (int b = 0; b < 256; b++) {
            int c = hist[b];
            hist[b] = pos;
            pos += c;
        }
        for (int i = 0; i < n; i++) {
            int p = hist[(ksrc[i] >> shift) & 255]++;
            dst[p] = src[i];
            kdst[p] = ksrc[i];
        }
        int32_t *s = src; src = dst; dst = s;
        uint32_t *ks = ksrc; ksrc = kdst; kdst = ks;
    }
    if (src != order) memcpy(order, src, (size_t)n * sizeof *order);
}

/* Per row: noisy = logits + noise, probs = softmax(noisy), expert_index = top-k.
 * Returns the number of rows with a NaN/inf logit or noisy logit. */
static long softmax_topk_rows(float *noisy, float *probs, int64_t *expert_index,
                              const float *logits, const float *noise, int T, int E, int k)
{
    long bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if ((long)T * E >= 65536)
    for (int t = 0; t < T; t++) {
        const float *l = logits + (long)t * E;
        const float *nz = noise ? noise + (long)t * E : NULL;
        float *g = noisy + (long)t * E;
        float *p = probs + (long)t * E;
        int finite = 1;
        float m = -INFINITY;
        for (int j = 0; j < E; j++) {
            float v = nz ? l[j] + nz[j] : l[j];
            g[j] = v;
            finite &= isfinite(l[j]) && isfinite(v);
            m = v > m ? v : m;
        }
        if (!finite) {
            bad++;
            continue;
        }
        float s = 0.0f;
        for (int j = 0; j < E; j++) {
            p[j] = dx_expf(g[j] - m);
            s += p[j];
        }
        float inv = 1.0f / s;
        for (int j = 0; j < E; j++) p[j] *= inv;
        topk_row(expert_index + (long)t * k, g, E, k);
    }
    return bad;
}

/* combine_weight of one token from its probs, choices and slots (see top). */
static void combine_row(float *w, const float *p, const int64_t *idx, const int64_t *slot, int k,
                        int normalize)
{
    float s = 1.0f;
    if (normalize != DAMEX_NORM_NONE) {
        s = 0.0f;
        for (int r = 0; r < k; r++)
            if (normalize == DAMEX_NORM_BEFORE_DROP || slot[r] >= 0) s += p[idx[r]];
    }
    for (int r = 0; r < k; r++) w[r] = slot[r] >= 0 ? p[idx[r]] / s : 0.0f;
}

int router_forward(float *logits, float *noisy_logits, float *probs, int64_t *expert_index,
                   float *combine_weight, int64_t *slot, int64_t *expert_count, int64_t *offset,
                   const float *x, const float *noise, const uint8_t *mask,
                   const float *w_router, int T, int D, int E, int k, long capacity, int bpr,
                   int normalize)
{
    if (T < 0 || D < 0 || E < 1 || k < 1 || k > E || capacity < -1 || normalize < 0 ||
        normalize > DAMEX_NORM_AFTER_DROP)
        return DAMEX_EINVAL;

    /* logits[T,E] = x[T,D] @ w_router[D,E] */
    sgemm_rm(0, 0, T, E, D, 1.0f, x, D, w_router, E, 0.0f, logits, E);
    if (softmax_topk_rows(noisy_logits, probs, expert_index, logits, noise, T, E, k))
        return DAMEX_ENONFINITE;

    /* Tokens in slot-filling priority: the unmasked ones, in token order or by
     * decreasing top-1 prob (key = ~bits of a positive float: ascending key =
     * descending prob; the radix sort is stable, so ties keep token order). */
    int32_t *order = NULL;
    int n = T;
    if (bpr && T > 0) {
        void *scratch = malloc((size_t)T * (2 * sizeof(int32_t) + 2 * sizeof(uint32_t)));
        if (!scratch) return DAMEX_ENOMEM;
        order = (int32_t *)scratch;
        int32_t *tmp = order + T;
        uint32_t *key = (uint32_t *)(tmp + T), *ktmp = key + T;
        n = 0;
        for (int t = 0; t < T; t++) {
            if (mask && !mask[t]) continue;
            uint32_t bits;
            memcpy(&bits, &probs[(long)t * E + expert_index[(long)t * k]], sizeof bits);
            order[n] = t;
            key[n] = ~bits;
            n++;
        }
        if (n > 1) radix_sort_stable(order, key, tmp, ktmp, n);
    }

    for (int e = 0; e < E; e++) expert_count[e] = 0;
    for (long i = 0; i < (long)T * k; i++) slot[i] = -1;
    for (int r = 0; r < k; r++) {
        for (int i = 0; i < n; i++) {
            int t = order ? order[i] : i;
            if (!order && mask && !mask[t]) continue;
            int64_t e = expert_index[(long)t * k + r];
            if (capacity < 0 || expert_count[e] < capacity) slot[(long)t * k + r] = expert_count[e]++;
        }
    }
    free(order);

    int64_t acc = 0;
    for (int e = 0; e < E; e++) {
        offset[e] = acc;
        acc += expert_count[e];
    }
    for (int t = 0; t < T; t++)
        combine_row(combine_weight + (long)t * k, probs + (long)t * E, expert_index + (long)t * k,
                    slot + (long)t * k, k, normalize);
    return DAMEX_OK;
}

/* Inverts  combine_weight[t,r] = kept[t,r] * p[t,e_r] / S[t]  and  p = softmax(g~).
 * With g_r = kept_r * dcombine_weight[t,r]:
 *   none:        dp[e_r] = g_r
 *   before_drop: dp[e_r] = (g_r - c) / S,  c = sum_r' g_r' p[e_r'] / S   (every r: S
 *                also holds the dropped choices' probs)
 *   after_drop:  dp[e_r] = kept_r (g_r - c) / S  (S, c over the kept choices)
 *   dlogits[t,j] += p[j] (dp[j] - sum_i p[i] dp[i])   (dp is 0 off the k choices)
 * The routing decisions (expert_index, slot) are constants. */
int router_backward(float *dlogits, const float *dcombine_weight, const float *probs,
                    const int64_t *expert_index, const int64_t *slot, int T, int E, int k,
                    int normalize)
{
    if (T < 0 || E < 1 || k < 1 || k > E || normalize < 0 || normalize > DAMEX_NORM_AFTER_DROP)
        return DAMEX_EINVAL;
    for (long i = 0; i < (long)T * k; i++)
        if (expert_index[i] < 0 || expert_index[i] >= E) return DAMEX_EINDEX;

#pragma omp parallel for schedule(static) if ((long)T * E >= 65536)
    for (int t = 0; t < T; t++) {
        const float *p = probs + (long)t * E;
        const float *dw = dcombine_weight + (long)t * k;
        const int64_t *idx = expert_index + (long)t * k;
        const int64_t *sl = slot + (long)t * k;
        float *dl = dlogits + (long)t * E;
        float s = 1.0f, c = 0.0f;
        if (normalize != DAMEX_NORM_NONE) {
            s = 0.0f;
            for (int r = 0; r < k; r++)
                if (normalize == DAMEX_NORM_BEFORE_DROP || sl[r] >= 0) s += p[idx[r]];
            if (s > 0.0f)
                for (int r = 0; r < k; r++)
                    if (sl[r] >= 0) c += dw[r] * p[idx[r]] / s;
        }
        /* dot = sum_i p[i] dp[i], over the k choices */
        float dot = 0.0f;
        for (int r = 0; r < k; r++) {
            int inside = normalize == DAMEX_NORM_BEFORE_DROP || sl[r] >= 0;
            float dp = inside && s > 0.0f ? ((sl[r] >= 0 ? dw[r] : 0.0f) - c) / s : 0.0f;
            dot += p[idx[r]] * dp;
        }
        for (int j = 0; j < E; j++) dl[j] -= p[j] * dot;
        for (int r = 0; r < k; r++) {
            int inside = normalize == DAMEX_NORM_BEFORE_DROP || sl[r] >= 0;
            float dp = inside && s > 0.0f ? ((sl[r] >= 0 ? dw[r] : 0.0f) - c) / s : 0.0f;
            dl[idx[r]] += p[idx[r]] * dp;
        }
    }
    return DAMEX_OK;
}

/* Inverts  logits[T,E] = x[T,D] @ w_router[D,E]:
 *   dx[T,D] += dlogits @ w_router^T,   dw_router[D,E] += x^T @ dlogits */
int router_logits_backward(float *dx, float *dw_router, const float *dlogits, const float *x,
                           const float *w_router, int T, int D, int E)
{
    if (T < 0 || D < 0 || E < 0) return DAMEX_EINVAL;
    sgemm_rm(0, 1, T, D, E, 1.0f, dlogits, E, w_router, E, 1.0f, dx, D);
    sgemm_rm(1, 0, D, E, T, 1.0f, x, D, dlogits, E, 1.0f, dw_router, E);
    return DAMEX_OK;
}
