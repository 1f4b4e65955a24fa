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
#include "parallel.h"
#include "cpu.h"

/* idx[1..k) = the rest of the top-k of g[0..E) in the order (descending value,
 * ascending index), idx[0] (the top-1) given.  The r-th choice is the largest
 * (value, -index) strictly below the (r-1)-th: O(kE), no scratch.  g finite. */
static inline void topk_rest(int64_t *idx, const float *g, int E, int k)
{
    int prev_i = (int)idx[0];
    float prev_v = g[prev_i];
    for (int r = 1; r < k; r++) {
        int best = 0;
        float best_v = -INFINITY;
        for (int j = 0; j < E; j++) {
            float v = g[j];
            int take = ((v < prev_v) | ((v == prev_v) & (j > prev_i))) & (v > best_v);
            best = take ? j : best;
            best_v = take ? v : best_v;
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

/* 8 floats: one AVX register, two SSE registers in the default clone. */
typedef float v8f __attribute__((vector_size(32)));
#define V8_LOAD(dst, p) memcpy(&(dst), (p), sizeof(dst))

/* logits[t0..t1, 0..E) = x[t0..t1, :] @ w for E <= 8 * NV, with w zero-padded
 * to wp[D, 8 * NV].  OpenBLAS packs all of x for a GEMM this narrow; this
 * reads each x row once, R rows at a time so that each wp vector loaded from
 * L1 feeds R independent FMAs, and sums over d in order like a plain dot. */
#define DEFINE_LOGITS_NARROW(NV, R)                                                            \
    DAMEX_CLONES_FMA                                                                              \
    static void logits_narrow_##NV(float *restrict logits, const float *restrict x,            \
                                   const float *restrict wp, int t0, int t1, int D, int E)     \
    {                                                                                          \
        int t = t0;                                                                            \
        for (; t + R <= t1; t += R) {                                                          \
            v8f a[R][NV];                                                                      \
            for (int r = 0; r < R; r++)                                                        \
                for (int v = 0; v < NV; v++) a[r][v] = (v8f){0};                               \
            const float *xr = x + (long)t * D;                                                 \
            for (int d = 0; d < D; d++) {                                                      \
                for (int v = 0; v < NV; v++) {                                                 \
                    v8f w;                                                                     \
                    V8_LOAD(w, wp + ((long)d * NV + v) * 8);                                   \
                    for (int r = 0; r < R; r++) a[r][v] += xr[(long)r * D + d] * w;            \
                }                                                                              \
            }                                                                                  \
            for (int r = 0; r < R; r++) {                                                      \
                float o[8 * NV];                                                               \
                memcpy(o, a[r], sizeof o);                                                     \
                memcpy(logits + (long)(t + r) * E, o, (size_t)E * sizeof(float));              \
            }                                                                                  \
        }                                                                                      \
        for (; t < t1; t++) {                                                                  \
            v8f a[NV];                                                                         \
            for (int v = 0; v < NV; v++) a[v] = (v8f){0};                                      \
            const float *xr = x + (long)t * D;                                                 \
            for (int d = 0; d < D; d++)                                                        \
                for (int v = 0; v < NV; v++) {                                                 \
                    v8f w;                                                                     \
                    V8_LOAD(w, wp + ((long)d * NV + v) * 8);                                   \
                    a[v] += xr[d] * w;                                                         \
                }                                                                              \
            float o[8 * NV];                                                                   \
            memcpy(o, a, sizeof o);                                                            \
            memcpy(logits + (long)t * E, o, (size_t)E * sizeof(float));                        \
        }                                                                                      \
    }
DEFINE_LOGITS_NARROW(1, 8)
DEFINE_LOGITS_NARROW(2, 4)

/* Rows per task of the narrow logits GEMM. */
#define LOGITS_BLOCK 256

/* logits[T,E] = x[T,D] @ w_router[D,E]; wp: D*16 floats of scratch (E <= 16). */
static void router_logits(float *logits, const float *x, const float *w_router, float *wp, int T,
                          int D, int E)
{
    if (E > 16 || D == 0) {
        sgemm_rm(0, 0, T, E, D, 1.0f, x, D, w_router, E, 0.0f, logits, E);
        return;
    }
    int ep = E <= 8 ? 8 : 16;
    for (int d = 0; d < D; d++)
        for (int e = 0; e < ep; e++) wp[(long)d * ep + e] = e < E ? w_router[(long)d * E + e] : 0.0f;
    int nblocks = (T + LOGITS_BLOCK - 1) / LOGITS_BLOCK;
#pragma omp parallel for schedule(static) if ((long)T * D * ep >= PAR_MIN_ROUTER_LOGITS)
    for (int b = 0; b < nblocks; b++) {
        int t0 = b * LOGITS_BLOCK, t1 = t0 + LOGITS_BLOCK < T ? t0 + LOGITS_BLOCK : T;
        if (ep == 8)
            logits_narrow_1(logits, x, wp, t0, t1, D, E);
        else
            logits_narrow_2(logits, x, wp, t0, t1, D, E);
    }
}

/* Rows per block of the row passes: the exp runs flat over a block, so that it
 * vectorises whatever E is. */
#define ROUTER_BLOCK 64


/* For rows [t0, t1): noisy = logits + noise, probs = softmax(noisy),
 * expert_index = top-k.  Returns the number of rows with a NaN/inf logit or
 * noisy logit (their probs and expert_index are left unset). */
DAMEX_CLONES_FMA
static long softmax_topk_block(float *restrict noisy, float *restrict probs,
                               int64_t *restrict expert_index, const float *restrict logits,
                               const float *restrict noise, int t0, int t1, int E, int k)
{
    long bad = 0;
    int finite_row[ROUTER_BLOCK];
    /* noisy, the row max and top-1 (strict >: ties to the lower index), p = g - max */
    for (int t = t0; t < t1; t++) {
        const float *l = logits + (long)t * E;
        float *g = noisy + (long)t * E;
        float *p = probs + (long)t * E;
        if (noise) {
            const float *nz = noise + (long)t * E;
            for (int j = 0; j < E; j++) g[j] = l[j] + nz[j];
        } else {
            for (int j = 0; j < E; j++) g[j] = l[j];
        }
        /* |v| < inf is false for NaN and +-inf; v - v != 0 would also catch them */
        int finite = 1, arg = 0;
        float m = g[0];
        for (int j = 0; j < E; j++) {
            finite &= (fabsf(l[j]) <= 3.4028234663852886e38f) & (fabsf(g[j]) <= 3.4028234663852886e38f);
            if (g[j] > m) {
                m = g[j];
                arg = j;
            }
        }
        finite_row[t - t0] = finite;
        if (!finite) {
            bad++;
            m = 0.0f;
        }
        for (int j = 0; j < E; j++) p[j] = finite ? g[j] - m : 0.0f;
        expert_index[(long)t * k] = arg;
    }
    /* flat exp over the block: vectorises for any E */
    float *pb = probs + (long)t0 * E;
    long n = (long)(t1 - t0) * E;
    for (long i = 0; i < n; i++) pb[i] = dx_expf(pb[i]);
    for (int t = t0; t < t1; t++) {
        float *p = probs + (long)t * E;
        float s = 0.0f;
        for (int j = 0; j < E; j++) s += p[j];
        float inv = 1.0f / s;
        for (int j = 0; j < E; j++) p[j] *= inv;
        if (k > 1 && finite_row[t - t0]) topk_rest(expert_index + (long)t * k, noisy + (long)t * E, E, k);
    }
    return bad;
}

static long softmax_topk_rows(float *noisy, float *probs, int64_t *expert_index,
                              const float *logits, const float *noise, int T, int E, int k)
{
    long bad = 0;
    int nblocks = (T + ROUTER_BLOCK - 1) / ROUTER_BLOCK;
#pragma omp parallel for schedule(static) reduction(+ : bad) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
    for (int b = 0; b < nblocks; b++) {
        int t0 = b * ROUTER_BLOCK, t1 = t0 + ROUTER_BLOCK < T ? t0 + ROUTER_BLOCK : T;
        bad += softmax_topk_block(noisy, probs, expert_index, logits, noise, t0, t1, E, k);
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

    /* One scratch block: the padded router weights (narrow GEMM) and, with
     * bpr, the token order, keys and their radix-sort copies. */
    size_t wp_bytes = E <= 16 ? (size_t)D * 16 * sizeof(float) : 0;
    size_t order_bytes = bpr ? (size_t)T * (2 * sizeof(int32_t) + 2 * sizeof(uint32_t)) : 0;
    void *scratch = NULL;
    if (wp_bytes + order_bytes) {
        scratch = malloc(wp_bytes + order_bytes);
        if (!scratch) return DAMEX_ENOMEM;
    }

    /* logits[T,E] = x[T,D] @ w_router[D,E] */
    router_logits(logits, x, w_router, (float *)scratch, T, D, E);
    if (softmax_topk_rows(noisy_logits, probs, expert_index, logits, noise, T, E, k)) {
        free(scratch);
        return DAMEX_ENONFINITE;
    }

    /* Tokens in slot-filling priority: the unmasked ones, in token order or by
     * decreasing top-1 prob (key = ~bits of a positive float: ascending key =
     * descending prob; the radix sort is stable, so ties keep token order). */
    int32_t *order = NULL;
    int n = T;
    if (bpr && T > 0) {
        order = (int32_t *)((char *)scratch + wp_bytes);
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
    free(scratch);

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

#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
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
 *   dx[T,D] += dlogits @ w_router^T,   dw_router[D,E] += x^T @ dlogits
 * (sgemm: narrow kernels like logits_narrow were measured no faster here, both
 * steps being bound by the memory traffic of x and dx.) */
int router_logits_backward(float *dx, float *dw_router, const float *dlogits, const float *x,
                           const float *w_router, int T, int D, int E)
{
    if (T < 0 || D < 0 || E < 0) return DAMEX_EINVAL;
    sgemm_rm(0, 1, T, D, E, 1.0f, dlogits, E, w_router, E, 1.0f, dx, D);
    sgemm_rm(1, 0, D, E, T, 1.0f, x, D, dlogits, E, 1.0f, dw_router, E);
    return DAMEX_OK;
}
