/* Auxiliary routing losses (SPEC section 3), forward and backward.
 *
 * Shapes: logits g[T,E] (row x is token x), noise[T,E], mask[T] (uint8, 0 =
 * padding, NULL = none), expert_target[T] int64.  M = the unmasked tokens.
 * Per-token work (softmax, logsumexp, top-k, erfc) is float; sums over tokens
 * are double, accumulated in fixed blocks of BLOCK tokens (one OpenMP
 * iteration each) and reduced in block order, so the result is the same for
 * any number of threads.  Every kernel returns a damex_status; NaN/inf in
 * logits or noise gives DAMEX_ENONFINITE. */
#include "routing_loss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"
#include "status.h"
#include "parallel.h"
#include "cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 256          /* tokens per block: the unit of work and of summation */
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

static inline int is_valid(const uint8_t *mask, long t) { return !mask || mask[t]; }

static int nblocks(int T) { return (T + BLOCK - 1) / BLOCK; }

static long count_valid(const uint8_t *mask, int T)
{
    if (!mask) return T;
    long n = 0;
    for (long t = 0; t < T; t++) n += mask[t] != 0;
    return n;
}

/* Per-call scratch: nb*W double partial sums (zeroed, one row per block: the
 * deterministic part) and, per thread, a block buffer buf[BLOCK*E] and per-row
 * rowv[BLOCK] (float) and rowi[BLOCK] (int). */
typedef struct {
    double *part;
    float *mem;
    size_t stride;
    int E;
} work;

static int work_alloc(work *w, int nb, int W, int E)
{
    int nth = 1;
#ifdef _OPENMP
    nth = omp_get_max_threads();
#endif
    nb = nb > 0 ? nb : 1; /* T = 0: keep the sizes nonzero */
    w->E = E > 0 ? E : 1;
    w->stride = (size_t)BLOCK * w->E + 2 * BLOCK;
    w->part = calloc((size_t)nb * (size_t)(W > 0 ? W : 1), sizeof(double));
    w->mem = malloc((size_t)nth * w->stride * sizeof(float));
    if (!w->part || !w->mem) {
        free(w->part);
        free(w->mem);
        w->part = NULL;
        w->mem = NULL;
        return DAMEX_ENOMEM;
    }
    return DAMEX_OK;
}

static void work_free(work *w)
{
    free(w->part);
    free(w->mem);
}

/* This thread's block buffer; rowv = buf + BLOCK*E, rowi after it. */
static float *work_buf(const work *w)
{
    int id = 0;
#ifdef _OPENMP
    id = omp_get_thread_num();
#endif
    return w->mem + (size_t)id * w->stride;
}

/* out[w] = sum over blocks b (in order) of part[b*W + w] */
static void reduce_blocks(double *out, const double *part, int nb, int W)
{
    for (int w = 0; w < W; w++) out[w] = 0.0;
    for (int b = 0; b < nb; b++)
        for (int w = 0; w < W; w++) out[w] += part[(size_t)b * W + w];
}

/* Token range [t0, t1) of block b. */
#define BLOCK_RANGE(b, T, t0, t1) \
    int t0 = (b) * BLOCK, t1 = (b) * BLOCK + BLOCK < (T) ? (b) * BLOCK + BLOCK : (T)

/* ---- flat elementwise passes over a block (vectorised) ---------------- */

/* 1 if every x[n] is finite */
DAMEX_CLONES
static int flat_finite(const float *restrict x, long n)
{
    int bad = 0;
    for (long i = 0; i < n; i++) bad |= !(fabsf(x[i]) <= 3.4028234663852886e38f);
    return !bad;
}

/* erfc(x) in float, relative error < 5e-7 for every x whose erfc is a normal
 * float (checked against double erfc), 0 beyond x = 10 (erfc < 3e-45).
 * Chebyshev fit of Numerical Recipes: erfc(u) = t exp(-u^2 - 1.26551223 + t P(t)),
 * t = 1 / (1 + u/2), u = |x|; u^2 = uh^2 + (u - uh)(u + uh) with uh = u
 * truncated to 12 mantissa bits, so uh^2 is exact and the large part of the
 * exponent costs no rounding; erfc(-u) = 2 - erfc(u). */
static inline float dx_erfcf(float x)
{
    float u = fabsf(x);
    float t = 1.0f / (1.0f + 0.5f * u);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    uint32_t bits;
    memcpy(&bits, &u, sizeof bits);
    bits &= 0xFFFFF000u;
    float uh;
    memcpy(&uh, &bits, sizeof uh);
    float y = -(u - uh) * (u + uh) - 1.26551223f + t * p;
    float r = t * dx_expf(-uh * uh) * dx_expf(y);
    r = u < 10.0f ? r : 0.0f;
    return x >= 0.0f ? r : 2.0f - r;
}

/* x[n] <- 1 - Phi(sqrt(2) x[n]) = erfc(x[n]) / 2  (x holds z / sqrt 2) */
DAMEX_CLONES
static void flat_normal_tail(float *restrict x, long n)
{
    for (long i = 0; i < n; i++) x[i] = 0.5f * dx_erfcf(x[i]);
}

/* g[n] <- exp(-x[n]^2), then x[n] <- erfc(x[n]) / 2 (forward and backward in one pass) */
DAMEX_CLONES
static void flat_normal_tail_gauss(float *restrict x, float *restrict g, long n)
{
    for (long i = 0; i < n; i++) {
        g[i] = dx_expf(-x[i] * x[i]);
        x[i] = 0.5f * dx_erfcf(x[i]);
    }
}

/* ---- per-row helpers --------------------------------------------------- */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Run `call` with E_ a compile-time constant for the common expert counts, so
 * that the per-row loops unroll and vectorise; any other E runs generic code. */
#define WITH_E(E, call) \
    switch (E) { \
    case 4: { const int E_ = 4; call; } break; \
    case 8: { const int E_ = 8; call; } break; \
    case 16: { const int E_ = 16; call; } break; \
    default: { const int E_ = (E); call; } break; \
    }

/* q[nt,E] = softmax of the rows of g (+ n), max-subtracted; if lse, lse[t] =
 * logsumexp of row t.  rowv[nt] gets the row sums of exp(g - max).  Every row is computed (padding
 * too): the exp then runs flat over the whole block. */
ALWAYS_INLINE void softmax_rows(float *restrict q, float *restrict rowv, float *restrict lse,
                                const float *restrict g, const float *restrict n, int nt, int E)
{
    for (int t = 0; t < nt; t++) {
        float *qr = q + (size_t)t * E;
        const float *gr = g + (size_t)t * E;
        if (n)
            for (int i = 0; i < E; i++) qr[i] = gr[i] + n[(size_t)t * E + i];
        else
            for (int i = 0; i < E; i++) qr[i] = gr[i];
        float m = qr[0];
        for (int i = 1; i < E; i++) m = qr[i] > m ? qr[i] : m;
        for (int i = 0; i < E; i++) qr[i] -= m;
        if (lse) lse[t] = m;
    }
    for (long i = 0; i < (long)nt * E; i++) q[i] = dx_expf(q[i]);
    for (int t = 0; t < nt; t++) {
        float *qr = q + (size_t)t * E;
        float s = 0.0f;
        for (int i = 0; i < E; i++) s += qr[i];
        float inv = 1.0f / s;
        for (int i = 0; i < E; i++) qr[i] *= inv;
        rowv[t] = s;
    }
    if (lse)
        for (int t = 0; t < nt; t++) lse[t] += logf(rowv[t]);
}

DAMEX_CLONES
static void block_softmax(float *restrict q, float *restrict rowv, float *restrict lse,
                          const float *restrict g, const float *restrict n, int nt, int E)
{
    WITH_E(E, softmax_rows(q, rowv, lse, g, n, nt, E_));
}

/* Index of the k-th entry of v[E] in the order (value descending, index
 * ascending): ties go to the lower index, as in the router's top-k.  If cnt is
 * given, cnt[j] += 1 for each of the k first entries j.  O(k E), branch-free
 * inner loop (v finite: the callers check). */
ALWAYS_INLINE int kth_largest(const float *v, int E, int k, double *cnt)
{
    if (k == 1) { /* top-1: the max, then its first index */
        float m = v[0];
        for (int i = 1; i < E; i++) m = v[i] > m ? v[i] : m;
        int j = 0;
        for (int i = E - 1; i >= 0; i--) j = v[i] == m ? i : j;
        if (cnt) cnt[j] += 1.0;
        return j;
    }
    int prev = -1;
    float pv = INFINITY;
    for (int r = 0; r < k; r++) {
        int best = -1;
        float bv = -INFINITY;
        for (int i = 0; i < E; i++) {
            float x = v[i];
            int after = (x < pv) | ((x == pv) & (i > prev)); /* after prev in the order */
            int take = after & ((x > bv) | (best < 0));
            best = take ? i : best;
            bv = take ? x : bv;
        }
        if (best < 0) return 0; /* NaN only */
        prev = best;
        pv = bv;
        if (cnt) cnt[best] += 1.0;
    }
    return prev;
}

/* acc[E] += x[t - t0, :] over the unmasked rows t of [t0, t1) */
ALWAYS_INLINE void acc_rows_e(double *restrict acc, const float *restrict x, const uint8_t *mask,
                              int t0, int t1, int E)
{
    for (int t = t0; t < t1; t++) {
        if (!is_valid(mask, t)) continue;
        const float *xr = x + (size_t)(t - t0) * E;
        for (int i = 0; i < E; i++) acc[i] += xr[i];
    }
}

DAMEX_CLONES
static void acc_rows(double *restrict acc, const float *restrict x, const uint8_t *mask, int t0,
                     int t1, int E)
{
    WITH_E(E, acc_rows_e(acc, x, mask, t0, t1, E_));
}

/* dg(x) += q(x) * (af - q(x) . af) for the unmasked rows of a block: the
 * backward of a softmax whose output feeds sum_i af_i q_i(x). */
ALWAYS_INLINE void softmax_grad_rows_e(float *restrict dlogits, const float *restrict q,
                                       const float *restrict af, const uint8_t *mask, int t0,
                                       int t1, int E)
{
    for (int t = t0; t < t1; t++) {
        if (!is_valid(mask, t)) continue;
        const float *qr = q + (size_t)(t - t0) * E;
        float *dg = dlogits + (size_t)t * E;
        float dot = 0.0f;
        for (int i = 0; i < E; i++) dot += qr[i] * af[i];
        for (int i = 0; i < E; i++) dg[i] += qr[i] * (af[i] - dot);
    }
}

DAMEX_CLONES
static void softmax_grad_rows(float *restrict dlogits, const float *restrict q,
                              const float *restrict af, const uint8_t *mask, int t0, int t1, int E)
{
    WITH_E(E, softmax_grad_rows_e(dlogits, q, af, mask, t0, t1, E_));
}

/* cnt[E] += the k first experts (ties to the lower index) of every unmasked row */
ALWAYS_INLINE void count_rows_e(double *restrict cnt, const float *restrict logits,
                                const uint8_t *mask, int t0, int t1, int E, int k)
{
    for (int t = t0; t < t1; t++)
        if (is_valid(mask, t)) kth_largest(logits + (size_t)t * E, E, k, cnt);
}

DAMEX_CLONES
static void count_rows(double *restrict cnt, const float *restrict logits, const uint8_t *mask,
                       int t0, int t1, int E, int k)
{
    WITH_E(E, count_rows_e(cnt, logits, mask, t0, t1, E_, k));
}

/* Are the rows [t0, t1) of x (and of y, if given) finite? */
static int rows_finite(const float *x, const float *y, int t0, int t1, int E)
{
    long n = (long)(t1 - t0) * E;
    size_t o = (size_t)t0 * E;
    return flat_finite(x + o, n) && (!y || flat_finite(y + o, n));
}

/* ---- coefficient of variation squared --------------------------------- */

/* L = var(S) / mean(S)^2 over S[E], var with (E - ddof) in the denominator;
 * a[i] = dL/dS_i = 2 (S_i - mu) / ((E - ddof) mu^2) - 2 var / (E mu^3)
 * (a may be NULL).  mean 0 (no unmasked token) -> L = 0, a = 0. */
static double cv_squared(double *a, const double *S, int E, int ddof)
{
    double mu = 0.0;
    for (int i = 0; i < E; i++) mu += S[i];
    mu /= E;
    if (!(mu > 0.0)) {
        if (a)
            for (int i = 0; i < E; i++) a[i] = 0.0;
        return 0.0;
    }
    double ss = 0.0;
    for (int i = 0; i < E; i++) ss += (S[i] - mu) * (S[i] - mu);
    double var = ss / (E - ddof);
    if (a)
        for (int i = 0; i < E; i++)
            a[i] = 2.0 * (S[i] - mu) / ((E - ddof) * mu * mu) - 2.0 * var / (E * mu * mu * mu);
    return var / (mu * mu);
}

static int check_variance(int variance, int E)
{
    if (variance != DAMEX_VAR_POPULATION && variance != DAMEX_VAR_UNBIASED) return DAMEX_EINVAL;
    if (E < 1 || E - variance < 1) return DAMEX_EINVAL; /* unbiased needs E >= 2 */
    return DAMEX_OK;
}

/* ---- importance (V-MoE) ----------------------------------------------- */

/* Imp[E] = sum_{x in M} softmax(g(x) (+ noise(x))); if qsave, qsave[T,E] = the softmax */
static int importance_sums(double *imp, float *qsave, const float *logits, const float *noise,
                           const uint8_t *mask, int T, int E)
{
    int nb = nblocks(T), bad = 0;
    work w;
    if (work_alloc(&w, nb, E, E)) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        if (!rows_finite(logits, noise, t0, t1, E)) {
            bad = 1;
            continue;
        }
        float *q = work_buf(&w), *rowv = q + (size_t)BLOCK * E;
        size_t o = (size_t)t0 * E;
        if (qsave) q = qsave + o;
        block_softmax(q, rowv, NULL, logits + o, noise ? noise + o : NULL, t1 - t0, E);
        acc_rows(w.part + (size_t)b * E, q, mask, t0, t1, E);
    }
    reduce_blocks(imp, w.part, nb, E);
    work_free(&w);
    return bad ? DAMEX_ENONFINITE : DAMEX_OK;
}

/* Imp_i = sum_{x in M} q_i(x),  q = softmax(g~), g~ = g (+ noise);
 * loss = var(Imp) / mean(Imp)^2 (population: /E, unbiased: /(E-1)). */
int importance_loss_forward(double *loss, const float *logits, const float *noise,
                            const uint8_t *mask, int T, int E, int variance)
{
    if (T < 0 || check_variance(variance, E)) return DAMEX_EINVAL;
    double *imp = malloc((size_t)E * sizeof(double));
    if (!imp) return DAMEX_ENOMEM;
    int st = importance_sums(imp, NULL, logits, noise, mask, T, E);
    *loss = st ? 0.0 : cv_squared(NULL, imp, E, variance);
    free(imp);
    return st;
}

/* inverts: loss = var(Imp) / mean(Imp)^2, Imp_i = sum_x q_i(x)
 * dg_i(x) += dy * q_i(x) (a_i - sum_j q_j(x) a_j),  a = dy/dImp (cv_squared) */
int importance_loss_backward(float *dlogits, double dy, const float *logits,
                             const float *noise, const uint8_t *mask, int T, int E, int variance)
{
    if (T < 0 || check_variance(variance, E)) return DAMEX_EINVAL;
    double *a = malloc(2 * (size_t)E * sizeof(double));
    float *af = malloc((size_t)E * sizeof(float));
    float *q = malloc(((size_t)T * E + 1) * sizeof(float)); /* the softmax, kept from pass 1 */
    int nb = nblocks(T), st = DAMEX_ENOMEM;
    if (!a || !af || !q) goto done;
    double *imp = a + E;
    st = importance_sums(imp, q, logits, noise, mask, T, E);
    if (st) goto done;
    cv_squared(a, imp, E, variance);
    for (int i = 0; i < E; i++) af[i] = (float)(dy * a[i]);
#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        softmax_grad_rows(dlogits, q + (size_t)t0 * E, af, mask, t0, t1, E);
    }
done:
    free(q);
    free(a);
    free(af);
    return st;
}

/* ---- load (V-MoE noisy top-k) ----------------------------------------- */

static int check_load(const float *noise, int T, int E, int k, double sigma, int variance)
{
    if (T < 0 || check_variance(variance, E)) return DAMEX_EINVAL;
    if (k < 1 || k > E || !(sigma > 0.0) || !isfinite(sigma)) return DAMEX_EINVAL;
    if (!noise) return DAMEX_EINVAL;
    return DAMEX_OK;
}

/* For the rows [t0, t1): rowi[t] = j(x), the index of the k-th largest noisy
 * logit, and u[t,i] = (g~_j - g_i) * c (c = 1 / (sigma sqrt 2)). */
ALWAYS_INLINE void load_block_u_e(float *restrict u, int *restrict rowi, const float *restrict g,
                                  const float *restrict n, int nt, int E, int k, float c)
{
    for (int t = 0; t < nt; t++) {
        float *ur = u + (size_t)t * E;
        const float *gr = g + (size_t)t * E, *nr = n + (size_t)t * E;
        for (int i = 0; i < E; i++) ur[i] = gr[i] + nr[i];
        int j = kth_largest(ur, E, k, NULL);
        float eta = ur[j];
        rowi[t] = j;
        for (int i = 0; i < E; i++) ur[i] = (eta - gr[i]) * c;
    }
}

DAMEX_CLONES
static void load_block_u(float *restrict u, int *restrict rowi, const float *restrict g,
                         const float *restrict n, int nt, int E, int k, float c)
{
    WITH_E(E, load_block_u_e(u, rowi, g, n, nt, E_, k, c));
}

/* With c[t,i] = exp(-u^2) on entry: c *= af; dg_i += c_i; dg_j -= sum_i c_i. */
ALWAYS_INLINE void load_grad_rows_e(float *restrict dlogits, float *restrict c,
                                    const int *restrict rowi, const float *restrict af,
                                    const uint8_t *mask, int t0, int t1, int E)
{
    for (int t = t0; t < t1; t++) {
        if (!is_valid(mask, t)) continue;
        float *cr = c + (size_t)(t - t0) * E, *dg = dlogits + (size_t)t * E, sum = 0.0f;
        for (int i = 0; i < E; i++) {
            cr[i] *= af[i];
            sum += cr[i];
        }
        /* the j-th term appears in both sums: its net derivative is 0 */
        for (int i = 0; i < E; i++) dg[i] += cr[i];
        dg[rowi[t - t0]] -= sum;
    }
}

DAMEX_CLONES
static void load_grad_rows(float *restrict dlogits, float *restrict c, const int *restrict rowi,
                           const float *restrict af, const uint8_t *mask, int t0, int t1, int E)
{
    WITH_E(E, load_grad_rows_e(dlogits, c, rowi, af, mask, t0, t1, E_));
}

/* Load[E] = sum_{x in M} P(x), P_i = 1 - Phi(z_i) = erfc(z_i / sqrt 2) / 2.
 * With gsave (and jsave): gsave[T,E] = exp(-z^2 / 2), jsave[T] = j(x), for the backward. */
static int load_sums(double *load, float *gsave, int *jsave, const float *logits,
                     const float *noise, const uint8_t *mask, int T, int E, int k, float c)
{
    int nb = nblocks(T), bad = 0;
    work w;
    if (work_alloc(&w, nb, E, E)) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_MIN_ROUTER_ROWS / 2)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        if (!rows_finite(logits, noise, t0, t1, E)) {
            bad = 1;
            continue;
        }
        float *u = work_buf(&w);
        int *rowi = (int *)(u + (size_t)BLOCK * E + BLOCK);
        size_t o = (size_t)t0 * E;
        if (jsave) rowi = jsave + t0;
        load_block_u(u, rowi, logits + o, noise + o, t1 - t0, E, k, c);
        if (gsave)
            flat_normal_tail_gauss(u, gsave + o, (long)(t1 - t0) * E);
        else
            flat_normal_tail(u, (long)(t1 - t0) * E);
        acc_rows(w.part + (size_t)b * E, u, mask, t0, t1, E);
    }
    reduce_blocks(load, w.part, nb, E);
    work_free(&w);
    return bad ? DAMEX_ENONFINITE : DAMEX_OK;
}

/* g~ = g + noise;  j(x) = index of the k-th largest g~(x) (ties to the lower index);
 * eta(x) = g~_j(x);  z_i(x) = (eta(x) - g_i(x)) / sigma;  P_i(x) = 1 - Phi(z_i(x));
 * Load_i = sum_{x in M} P_i(x);  loss = var(Load) / mean(Load)^2. */
int load_loss_forward(double *loss, const float *logits, const float *noise,
                      const uint8_t *mask, int T, int E, int k, double sigma, int variance)
{
    if (check_load(noise, T, E, k, sigma, variance)) return DAMEX_EINVAL;
    double *load = malloc((size_t)E * sizeof(double));
    if (!load) return DAMEX_ENOMEM;
    int st = load_sums(load, NULL, NULL, logits, noise, mask, T, E, k,
                       (float)(1.0 / sigma) * INV_SQRT2);
    *loss = st ? 0.0 : cv_squared(NULL, load, E, variance);
    free(load);
    return st;
}

/* inverts: z_i = (g_j + noise_j - g_i) / sigma,  P_i = 1 - Phi(z_i),  Load_i = sum_x P_i
 * dP_i/dg_i = phi(z_i)/sigma and dP_i/dg_j = -phi(z_i)/sigma for i != j; P_j depends
 * on noise_j only (z_j = noise_j / sigma), so with c_i = a_i phi(z_i) / sigma,
 * a = dy/dLoad:  dg_i += c_i (i != j),  dg_j += -sum_{i != j} c_i.
 * At a tie of the k-th noisy logit this is the derivative for the tie-broken j. */
int load_loss_backward(float *dlogits, double dy, const float *logits, const float *noise,
                       const uint8_t *mask, int T, int E, int k, double sigma, int variance)
{
    if (check_load(noise, T, E, k, sigma, variance)) return DAMEX_EINVAL;
    float c = (float)(1.0 / sigma) * INV_SQRT2;
    double *a = malloc(2 * (size_t)E * sizeof(double));
    float *af = malloc((size_t)E * sizeof(float));
    float *gs = malloc(((size_t)T * E + 1) * sizeof(float)); /* exp(-z^2/2) from pass 1 */
    int *js = malloc(((size_t)T + 1) * sizeof(int));         /* j(x) from pass 1 */
    int nb = nblocks(T), st = DAMEX_ENOMEM;
    if (!a || !af || !gs || !js) goto done;
    double *load = a + E;
    st = load_sums(load, gs, js, logits, noise, mask, T, E, k, c);
    if (st) goto done;
    cv_squared(a, load, E, variance);
    /* phi(z) / sigma = exp(-z^2/2) / (sqrt(2 pi) sigma) */
    for (int i = 0; i < E; i++) af[i] = (float)(dy * a[i] / sigma) * INV_SQRT_2PI;
#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_MIN_ROUTER_ROWS / 2)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        load_grad_rows(dlogits, gs + (size_t)t0 * E, js + t0, af, mask, t0, t1, E);
    }
done:
    free(gs);
    free(js);
    free(a);
    free(af);
    return st;
}

/* ---- Switch / GShard balance loss ------------------------------------- */

/* out[0:E] = counts of the top-1 (TOP1) or of all top-k choices (TOPK) over M;
 * with probs, out[E:2E] = sum_{x in M} q(x).  W = 2E doubles per block. */
static int switch_sums(double *out, int with_probs, const float *logits, const uint8_t *mask,
                       int T, int E, int k, int counts)
{
    int nb = nblocks(T), bad = 0, kk = counts == DAMEX_COUNTS_TOPK ? k : 1;
    work w;
    if (work_alloc(&w, nb, 2 * E, E)) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        if (!rows_finite(logits, NULL, t0, t1, E)) {
            bad = 1;
            continue;
        }
        double *cnt = w.part + (size_t)b * 2 * E, *psum = cnt + E;
        count_rows(cnt, logits, mask, t0, t1, E, kk);
        if (!with_probs) continue;
        float *q = work_buf(&w), *rowv = q + (size_t)BLOCK * E;
        block_softmax(q, rowv, NULL, logits + (size_t)t0 * E, NULL, t1 - t0, E);
        acc_rows(psum, q, mask, t0, t1, E);
    }
    reduce_blocks(out, w.part, nb, 2 * E);
    work_free(&w);
    return bad ? DAMEX_ENONFINITE : DAMEX_OK;
}

static int check_switch(int T, int E, int k, int counts)
{
    if (T < 0 || E < 1 || k < 1 || k > E) return DAMEX_EINVAL;
    if (counts != DAMEX_COUNTS_TOP1 && counts != DAMEX_COUNTS_TOPK) return DAMEX_EINVAL;
    return DAMEX_OK;
}

/* K = 1 (TOP1: the top-1 expert of each token, ties to the lower index) or k (TOPK:
 * every one of the k choices);  f_i = count_i / (K |M|);  P_i = (1/|M|) sum_x q_i(x);
 * loss = E sum_i f_i P_i  (f is piecewise constant: no gradient through it). */
int switch_loss_forward(double *loss, const float *logits, const uint8_t *mask, int T, int E,
                        int k, int counts)
{
    if (check_switch(T, E, k, counts)) return DAMEX_EINVAL;
    double *sums = malloc(2 * (size_t)E * sizeof(double));
    if (!sums) return DAMEX_ENOMEM;
    int st = switch_sums(sums, 1, logits, mask, T, E, k, counts);
    long n = count_valid(mask, T);
    double kk = counts == DAMEX_COUNTS_TOPK ? k : 1, l = 0.0;
    if (!st && n > 0)
        for (int i = 0; i < E; i++) l += sums[i] * sums[E + i];
    *loss = n > 0 ? E * l / (kk * (double)n * (double)n) : 0.0;
    free(sums);
    return st;
}

/* inverts: loss = E sum_i f_i (1/|M|) sum_x q_i(x)
 * dg_i(x) += q_i(x) (a_i - sum_j q_j(x) a_j),  a_i = dy E f_i / |M| */
int switch_loss_backward(float *dlogits, double dy, const float *logits, const uint8_t *mask,
                         int T, int E, int k, int counts)
{
    if (check_switch(T, E, k, counts)) return DAMEX_EINVAL;
    double *sums = malloc(2 * (size_t)E * sizeof(double));
    float *af = malloc((size_t)E * sizeof(float));
    work w = {0};
    int nb = nblocks(T), st = DAMEX_ENOMEM;
    long n = count_valid(mask, T);
    if (!sums || !af || work_alloc(&w, nb, 0, E)) goto done;
    st = switch_sums(sums, 0, logits, mask, T, E, k, counts);
    if (st || n == 0) goto done;
    double kk = counts == DAMEX_COUNTS_TOPK ? k : 1;
    for (int i = 0; i < E; i++) af[i] = (float)(dy * E * sums[i] / (kk * (double)n * (double)n));
#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        float *q = work_buf(&w), *rowv = q + (size_t)BLOCK * E;
        block_softmax(q, rowv, NULL, logits + (size_t)t0 * E, NULL, t1 - t0, E);
        softmax_grad_rows(dlogits, q, af, mask, t0, t1, E);
    }
done:
    if (w.part) work_free(&w);
    free(sums);
    free(af);
    return st;
}

/* ---- router z-loss (ST-MoE) and DAMEX loss ---------------------------- */

/* One pass over the unmasked tokens: sum of per-token values (z: lse^2;
 * damex: lse - g_target) and, with dlogits, the per-token gradient scaled by
 * scale = dy / |M|.  target == NULL selects the z-loss. */
static int lse_pass(double *total, float *dlogits, double scale, const float *logits,
                    const int64_t *target, const uint8_t *mask, int T, int E)
{
    int nb = nblocks(T), bad = 0, badidx = 0;
    if (target)
        for (long t = 0; t < T; t++)
            if (is_valid(mask, t) && (target[t] < 0 || target[t] >= E)) return DAMEX_EINDEX;
    work w;
    if (work_alloc(&w, nb, 1, E)) return DAMEX_ENOMEM;
    float sc = (float)scale;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_MIN_ROUTER_ROWS)
    for (int b = 0; b < nb; b++) {
        BLOCK_RANGE(b, T, t0, t1);
        if (!rows_finite(logits, NULL, t0, t1, E)) {
            bad = 1;
            continue;
        }
        float *q = work_buf(&w), *rowv = q + (size_t)BLOCK * E, *lse = rowv + BLOCK;
        block_softmax(q, rowv, lse, logits + (size_t)t0 * E, NULL, t1 - t0, E);
        double acc = 0.0;
        for (int t = t0; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            const float *qr = q + (size_t)(t - t0) * E;
            float *dg = dlogits ? dlogits + (size_t)t * E : NULL, l = lse[t - t0];
            if (target) {
                int64_t y = target[t];
                acc += (double)l - (double)logits[(size_t)t * E + y];
                if (dg) {
                    for (int i = 0; i < E; i++) dg[i] += sc * qr[i];
                    dg[y] -= sc;
                }
            } else {
                acc += (double)l * (double)l;
                if (dg) {
                    float c = 2.0f * sc * l;
                    for (int i = 0; i < E; i++) dg[i] += c * qr[i];
                }
            }
        }
        w.part[b] = acc;
    }
    double sum = 0.0;
    for (int b = 0; b < nb; b++) sum += w.part[b];
    *total = sum;
    work_free(&w);
    return badidx ? DAMEX_EINDEX : bad ? DAMEX_ENONFINITE : DAMEX_OK;
}

/* lse(x) = logsumexp_i g_i(x);  loss = (1/|M|) sum_{x in M} lse(x)^2 */
int z_loss_forward(double *loss, const float *logits, const uint8_t *mask, int T, int E)
{
    if (T < 0 || E < 1) return DAMEX_EINVAL;
    long n = count_valid(mask, T);
    double sum = 0.0;
    int st = lse_pass(&sum, NULL, 0.0, logits, NULL, mask, T, E);
    *loss = !st && n > 0 ? sum / (double)n : 0.0;
    return st;
}

/* inverts: loss = (1/|M|) sum_x lse(x)^2
 * dg_i(x) += dy * 2 lse(x) q_i(x) / |M| */
int z_loss_backward(float *dlogits, double dy, const float *logits, const uint8_t *mask, int T,
                    int E)
{
    if (T < 0 || E < 1) return DAMEX_EINVAL;
    long n = count_valid(mask, T);
    if (n == 0) return DAMEX_OK;
    double sum;
    return lse_pass(&sum, dlogits, dy / (double)n, logits, NULL, mask, T, E);
}

/* loss = -(1/|M|) sum_{x in M} log q_{y(x)}(x) = (1/|M|) sum_x (lse(x) - g_{y(x)}(x)),
 * y = expert_target */
int damex_loss_forward(double *loss, const float *logits, const int64_t *expert_target,
                       const uint8_t *mask, int T, int E)
{
    if (T < 0 || E < 1) return DAMEX_EINVAL;
    long n = count_valid(mask, T);
    double sum = 0.0;
    int st = lse_pass(&sum, NULL, 0.0, logits, expert_target, mask, T, E);
    *loss = !st && n > 0 ? sum / (double)n : 0.0;
    return st;
}

/* inverts: loss = (1/|M|) sum_x (lse(x) - g_{y(x)}(x))
 * dg_i(x) += dy * (q_i(x) - [i == y(x)]) / |M| */
int damex_loss_backward(float *dlogits, double dy, const float *logits,
                        const int64_t *expert_target, const uint8_t *mask, int T, int E)
{
    if (T < 0 || E < 1) return DAMEX_EINVAL;
    long n = count_valid(mask, T);
    if (n == 0) return DAMEX_OK;
    double sum;
    return lse_pass(&sum, dlogits, dy / (double)n, logits, expert_target, mask, T, E);
}
