/* Masked multi-head attention.  Head h of image n reads the column slice
 * [h*d, (h+1)*d) of q, k, v (row stride C), so every (n, h) pair is one
 * independent task with disjoint outputs: OpenMP over the pairs, each task
 * two or four single-threaded sgemms and a row softmax, no atomics. */
#include "attention.h"

#include <math.h>
#include <stdlib.h>

#include "blas.h"
#include "fastmath.h"
#include "reduce.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* One row of P in place: a[j] = -inf where am[j] or kpm[j] (either may be NULL),
 * then softmax; a row with every key blocked becomes 0.  Branch-free passes that
 * vectorise (max in DX_LANES lanes, dx_expf, reduce.h's sum): the scalar expf
 * loop was most of the forward's time. */
DAMEX_CLONES
static void masked_softmax_row(float *restrict a, const uint8_t *restrict am,
                               const uint8_t *restrict kpm, long Lk)
{
    if (am && kpm)
        for (long j = 0; j < Lk; j++) a[j] = (am[j] | kpm[j]) ? -INFINITY : a[j];
    else if (am)
        for (long j = 0; j < Lk; j++) a[j] = am[j] ? -INFINITY : a[j];
    else if (kpm)
        for (long j = 0; j < Lk; j++) a[j] = kpm[j] ? -INFINITY : a[j];
    float mx[DX_LANES];
    for (int l = 0; l < DX_LANES; l++) mx[l] = -INFINITY;
    long j = 0;
    for (; j + DX_LANES <= Lk; j += DX_LANES)
        for (int l = 0; l < DX_LANES; l++) mx[l] = a[j + l] > mx[l] ? a[j + l] : mx[l];
    float m = -INFINITY;
    for (; j < Lk; j++) m = a[j] > m ? a[j] : m;
    for (int l = 0; l < DX_LANES; l++) m = mx[l] > m ? mx[l] : m;
    if (m == -INFINITY) { /* every key blocked */
        for (j = 0; j < Lk; j++) a[j] = 0.0f;
        return;
    }
    for (j = 0; j < Lk; j++) {
        float d = a[j] - m; /* -inf where blocked */
        a[j] = d < -87.0f ? 0.0f : dx_expf(d);
    }
    float inv = (float)(1.0 / dx_sum(a, Lk));
    for (j = 0; j < Lk; j++) a[j] *= inv;
}

/* g[j] = p[j] (g[j] - sum_j g[j] p[j]), in place; the sum in DX_LANES lanes. */
DAMEX_CLONES
static void softmax_grad_row(float *restrict g, const float *restrict p, long Lk)
{
    float acc[DX_LANES] = {0};
    long j = 0;
    for (; j + DX_LANES <= Lk; j += DX_LANES)
        for (int l = 0; l < DX_LANES; l++) acc[l] += g[j + l] * p[j + l];
    float dot = 0.0f;
    for (; j < Lk; j++) dot += g[j] * p[j];
    for (int l = 0; l < DX_LANES; l++) dot += acc[l];
    for (j = 0; j < Lk; j++) g[j] = p[j] * (g[j] - dot);
}

/* attention_forward
 *   out[N, Lq, C], attn[N, H, Lq, Lk] (saved for backward: the probabilities)
 *   q[N, Lq, C], k[N, Lk, C], v[N, Lk, C], C = H * d
 *   attn_mask[Lq, Lk] or NULL, key_padding_mask[N, Lk] or NULL (nonzero = blocked)
 *   S = q_h k_h^T / sqrt(d);  S_ij = -inf where blocked
 *   P = softmax over j of S  (a row with every key blocked gives P = 0)
 *   out_h = P v_h */
int attention_forward(float *out, float *attn, const float *q, const float *k, const float *v,
                      const uint8_t *attn_mask, const uint8_t *key_padding_mask, int N, int Lq,
                      int Lk, int C, int H)
{
    if (N < 0 || Lq < 0 || Lk < 0 || H < 1 || C % H) return DAMEX_EINVAL;
    const int d = C / H;
    const float scale = 1.0f / sqrtf((float)d);
    const long pairs = (long)N * H;
    const int par = (long)N * H * Lq * Lk * d >= PAR_MIN_ATTENTION && pairs > 1;
    if (par) blas_single_thread_begin();
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (long nh = 0; nh < pairs; nh++) {
        const int n = (int)(nh / H), h = (int)(nh % H);
        const float *qh = q + (long)n * Lq * C + (long)h * d;
        const float *kh = k + (long)n * Lk * C + (long)h * d;
        const float *vh = v + (long)n * Lk * C + (long)h * d;
        const uint8_t *kpm = key_padding_mask ? key_padding_mask + (long)n * Lk : NULL;
        float *P = attn + nh * Lq * Lk;
        sgemm_rm(0, 1, Lq, Lk, d, scale, qh, C, kh, C, 0.0f, P, Lk);
        for (int i = 0; i < Lq; i++)
            masked_softmax_row(P + (long)i * Lk, attn_mask ? attn_mask + (long)i * Lk : NULL, kpm,
                               Lk);
        sgemm_rm(0, 0, Lq, d, Lk, 1.0f, P, Lk, vh, C, 0.0f, out + (long)n * Lq * C + (long)h * d, C);
    }
    if (par) blas_single_thread_end();
    return DAMEX_OK;
}

/* attention_backward (accumulates into dq, dk, dv, which the caller zeroed)
 *   inverts  out_h = P v_h:       dP = dy_h v_h^T,  dv_h += P^T dy_h
 *   inverts  P = softmax(S):      dS = P * (dP - rowsum(dP * P))   (0 where blocked, as P = 0)
 *   inverts  S = q_h k_h^T / sqrt(d):  dq_h += dS k_h / sqrt(d),  dk_h += dS^T q_h / sqrt(d) */
int attention_backward(float *dq, float *dk, float *dv, const float *dy, const float *attn,
                       const float *q, const float *k, const float *v, int N, int Lq, int Lk,
                       int C, int H)
{
    if (N < 0 || Lq < 0 || Lk < 0 || H < 1 || C % H) return DAMEX_EINVAL;
    const int d = C / H;
    const float scale = 1.0f / sqrtf((float)d);
    const long pairs = (long)N * H;
    if (pairs == 0 || Lq == 0 || Lk == 0) return DAMEX_OK;
    const int par = (long)N * H * Lq * Lk * d >= PAR_MIN_ATTENTION && pairs > 1;
    int threads = 1;
#ifdef _OPENMP
    if (par) threads = omp_get_max_threads();
#endif
    float *scratch = malloc(sizeof(float) * (size_t)threads * Lq * Lk);
    if (!scratch) return DAMEX_ENOMEM;
    if (par) blas_single_thread_begin();
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (long nh = 0; nh < pairs; nh++) {
        int tid = 0;
#ifdef _OPENMP
        if (par) tid = omp_get_thread_num();
#endif
        const int n = (int)(nh / H), h = (int)(nh % H);
        const long qo = (long)n * Lq * C + (long)h * d, ko = (long)n * Lk * C + (long)h * d;
        const float *P = attn + nh * Lq * Lk;
        float *dS = scratch + (size_t)tid * Lq * Lk;
        sgemm_rm(0, 1, Lq, Lk, d, 1.0f, dy + qo, C, v + ko, C, 0.0f, dS, Lk);
        sgemm_rm(1, 0, Lk, d, Lq, 1.0f, P, Lk, dy + qo, C, 1.0f, dv + ko, C);
        for (int i = 0; i < Lq; i++) softmax_grad_row(dS + (long)i * Lk, P + (long)i * Lk, Lk);
        sgemm_rm(0, 0, Lq, d, Lk, scale, dS, Lk, k + ko, C, 1.0f, dq + qo, C);
        sgemm_rm(1, 0, Lk, d, Lq, scale, dS, Lk, q + qo, C, 1.0f, dk + ko, C);
    }
    if (par) blas_single_thread_end();
    free(scratch);
    return DAMEX_OK;
}
