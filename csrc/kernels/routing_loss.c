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

#define BLOCK 256          /* tokens per block: the unit of work and of summation */
#define PAR_WORK 65536L    /* T*E from which OpenMP pays for its fork/join */
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

/* Per-call scratch: nb*W double partial sums (zeroed) and nb*E float rows. */
typedef struct {
    double *part;
    float *row;
} scratch;

static int scratch_alloc(scratch *s, int nb, int W, int E)
{
    nb = nb > 0 ? nb : 1; /* T = 0: keep the sizes nonzero */
    E = E > 0 ? E : 1;
    s->part = calloc((size_t)nb * (size_t)(W > 0 ? W : 1), sizeof(double));
    s->row = malloc((size_t)nb * (size_t)E * sizeof(float));
    if (!s->part || !s->row) {
        free(s->part);
        free(s->row);
        return DAMEX_ENOMEM;
    }
    return DAMEX_OK;
}

static void scratch_free(scratch *s)
{
    free(s->part);
    free(s->row);
}

/* out[w] = sum over blocks b (in order) of part[b*W + w] */
static void reduce_blocks(double *out, const double *part, int nb, int W)
{
    for (int w = 0; w < W; w++) out[w] = 0.0;
    for (int b = 0; b < nb; b++)
        for (int w = 0; w < W; w++) out[w] += part[(size_t)b * W + w];
}

/* v[E] = g[E] (+ n[E]); returns 0 if any entry is NaN or inf. */
static inline int load_row(float *restrict v, const float *restrict g, const float *restrict n,
                           int E)
{
    float chk = 0.0f; /* v - v is NaN exactly for NaN/inf */
    if (n)
        for (int i = 0; i < E; i++) {
            v[i] = g[i] + n[i];
            chk += (g[i] - g[i]) + (n[i] - n[i]);
        }
    else
        for (int i = 0; i < E; i++) {
            v[i] = g[i];
            chk += g[i] - g[i];
        }
    return chk == 0.0f;
}

/* In place: v[E] <- softmax(v); returns logsumexp(v).  Max-subtracted. */
static inline float softmax_inplace(float *v, int E)
{
    float m = v[0];
    for (int i = 1; i < E; i++) m = v[i] > m ? v[i] : m;
    float s = 0.0f;
    for (int i = 0; i < E; i++) {
        v[i] = dx_expf(v[i] - m);
        s += v[i];
    }
    float inv = 1.0f / s;
    for (int i = 0; i < E; i++) v[i] *= inv;
    return m + logf(s);
}

/* Index of the k-th entry of v[E] in the order (value descending, index
 * ascending): ties go to the lower index, as in the router's top-k.  If cnt is
 * given, cnt[j] += 1 for each of the k first entries j.  O(k E). */
static inline int kth_largest(const float *v, int E, int k, double *cnt)
{
    int prev = -1;
    float pv = 0.0f;
    for (int r = 0; r < k; r++) {
        int best = -1;
        float bv = 0.0f;
        for (int i = 0; i < E; i++) {
            float x = v[i];
            int after = prev < 0 || x < pv || (x == pv && i > prev);
            if (after && (best < 0 || x > bv)) {
                best = i;
                bv = x;
            }
        }
        prev = best;
        pv = bv;
        if (cnt) cnt[best] += 1.0;
    }
    return prev;
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

/* Imp[E] = sum_{x in M} softmax(g(x) (+ noise(x))) */
static int importance_sums(double *imp, const float *logits, const float *noise,
                           const uint8_t *mask, int T, int E)
{
    int nb = nblocks(T), bad = 0;
    scratch s;
    if (scratch_alloc(&s, nb, E, E)) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_WORK)
    for (int b = 0; b < nb; b++) {
        double *acc = s.part + (size_t)b * E;
        float *q = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            if (!load_row(q, logits + o, noise ? noise + o : NULL, E)) bad = 1;
            softmax_inplace(q, E);
            for (int i = 0; i < E; i++) acc[i] += q[i];
        }
    }
    reduce_blocks(imp, s.part, nb, E);
    scratch_free(&s);
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
    int st = importance_sums(imp, logits, noise, mask, T, E);
    *loss = st ? 0.0 : cv_squared(NULL, imp, E, variance);
    free(imp);
    return st;
}

/* inverts: loss = var(Imp) / mean(Imp)^2, Imp_i = sum_x q_i(x)
 * dg_i(x) += dloss * q_i(x) (a_i - sum_j q_j(x) a_j),  a = dloss/dImp (cv_squared) */
int importance_loss_backward(float *dlogits, double dloss, const float *logits,
                             const float *noise, const uint8_t *mask, int T, int E, int variance)
{
    if (T < 0 || check_variance(variance, E)) return DAMEX_EINVAL;
    double *a = malloc(2 * (size_t)E * sizeof(double));
    if (!a) return DAMEX_ENOMEM;
    double *imp = a + E;
    int st = importance_sums(imp, logits, noise, mask, T, E);
    if (st) {
        free(a);
        return st;
    }
    cv_squared(a, imp, E, variance);
    int nb = nblocks(T);
    scratch s;
    if (scratch_alloc(&s, nb, E, E)) {
        free(a);
        return DAMEX_ENOMEM;
    }
    float *af = (float *)s.part; /* first E floats: dloss * a as float */
    for (int i = 0; i < E; i++) af[i] = (float)(dloss * a[i]);
#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_WORK)
    for (int b = 0; b < nb; b++) {
        float *q = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            load_row(q, logits + o, noise ? noise + o : NULL, E);
            softmax_inplace(q, E);
            float dot = 0.0f;
            for (int i = 0; i < E; i++) dot += q[i] * af[i];
            for (int i = 0; i < E; i++) dlogits[o + i] += q[i] * (af[i] - dot);
        }
    }
    scratch_free(&s);
    free(a);
    return DAMEX_OK;
}

/* ---- load (V-MoE noisy top-k) ----------------------------------------- */

static int check_load(const float *noise, int T, int E, int k, double sigma, int variance)
{
    if (T < 0 || check_variance(variance, E)) return DAMEX_EINVAL;
    if (k < 1 || k > E || !(sigma > 0.0) || !isfinite(sigma)) return DAMEX_EINVAL;
    if (!noise) return DAMEX_EINVAL;
    return DAMEX_OK;
}

/* Load[E] = sum_{x in M} P(x), P_i = 1 - Phi(z_i) = erfc(z_i / sqrt 2) / 2 */
static int load_sums(double *load, const float *logits, const float *noise, const uint8_t *mask,
                     int T, int E, int k, float inv_sigma)
{
    int nb = nblocks(T), bad = 0;
    scratch s;
    if (scratch_alloc(&s, nb, E, E)) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_WORK / 4)
    for (int b = 0; b < nb; b++) {
        double *acc = s.part + (size_t)b * E;
        float *v = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            const float *g = logits + o;
            if (!load_row(v, g, noise + o, E)) {
                bad = 1;
                continue;
            }
            float eta = v[kth_largest(v, E, k, NULL)];
            for (int i = 0; i < E; i++) {
                float z = (eta - g[i]) * inv_sigma;
                acc[i] += 0.5f * dx_erfcf(z * INV_SQRT2);
            }
        }
    }
    reduce_blocks(load, s.part, nb, E);
    scratch_free(&s);
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
    int st = load_sums(load, logits, noise, mask, T, E, k, (float)(1.0 / sigma));
    *loss = st ? 0.0 : cv_squared(NULL, load, E, variance);
    free(load);
    return st;
}

/* inverts: z_i = (g_j + noise_j - g_i) / sigma,  P_i = 1 - Phi(z_i),  Load_i = sum_x P_i
 * dP_i/dg_i = phi(z_i)/sigma and dP_i/dg_j = -phi(z_i)/sigma for i != j; P_j depends
 * on noise_j only (z_j = noise_j / sigma), so with c_i = a_i phi(z_i) / sigma,
 * a = dloss/dLoad:  dg_i += c_i (i != j),  dg_j += -sum_{i != j} c_i.
 * At a tie of the k-th noisy logit this is the derivative for the tie-broken j. */
int load_loss_backward(float *dlogits, double dloss, const float *logits, const float *noise,
                       const uint8_t *mask, int T, int E, int k, double sigma, int variance)
{
    if (check_load(noise, T, E, k, sigma, variance)) return DAMEX_EINVAL;
    float inv_sigma = (float)(1.0 / sigma);
    double *a = malloc(2 * (size_t)E * sizeof(double));
    if (!a) return DAMEX_ENOMEM;
    double *load = a + E;
    int st = load_sums(load, logits, noise, mask, T, E, k, inv_sigma);
    if (st) {
        free(a);
        return st;
    }
    cv_squared(a, load, E, variance);
    int nb = nblocks(T);
    scratch s;
    if (scratch_alloc(&s, nb, E, E)) {
        free(a);
        return DAMEX_ENOMEM;
    }
    float *af = (float *)s.part; /* dloss * a / sigma as float */
    for (int i = 0; i < E; i++) af[i] = (float)(dloss * a[i] / sigma);
#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_WORK / 4)
    for (int b = 0; b < nb; b++) {
        float *v = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            const float *g = logits + o;
            float *dg = dlogits + o;
            load_row(v, g, noise + o, E);
            int j = kth_largest(v, E, k, NULL);
            float eta = v[j], sum = 0.0f;
            for (int i = 0; i < E; i++) {
                float z = (eta - g[i]) * inv_sigma;
                float c = af[i] * INV_SQRT_2PI * dx_expf(-0.5f * z * z);
                v[i] = c;
                sum += c;
            }
            /* the j-th term appears in both: its net derivative is 0 */
            for (int i = 0; i < E; i++) dg[i] += v[i];
            dg[j] -= sum;
        }
    }
    scratch_free(&s);
    free(a);
    return DAMEX_OK;
}

/* ---- Switch / GShard balance loss ------------------------------------- */

/* part: per block E counts then E probability sums (W = 2E), reduced into out[2E]. */
static int switch_sums(double *out, int with_probs, const float *logits, const uint8_t *mask,
                       int T, int E, int k, int counts)
{
    int nb = nblocks(T), bad = 0, kk = counts == DAMEX_COUNTS_TOPK ? k : 1;
    scratch s;
    if (scratch_alloc(&s, nb, 2 * E, E)) return DAMEX_ENOMEM;
#pragma omp parallel for schedule(static) reduction(| : bad) if ((long)T * E >= PAR_WORK)
    for (int b = 0; b < nb; b++) {
        double *cnt = s.part + (size_t)b * 2 * E, *psum = cnt + E;
        float *q = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            if (!load_row(q, logits + o, NULL, E)) {
                bad = 1;
                continue;
            }
            kth_largest(q, E, kk, cnt);
            if (with_probs) {
                softmax_inplace(q, E);
                for (int i = 0; i < E; i++) psum[i] += q[i];
            }
        }
    }
    reduce_blocks(out, s.part, nb, 2 * E);
    scratch_free(&s);
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
 * dg_i(x) += q_i(x) (a_i - sum_j q_j(x) a_j),  a_i = dloss E f_i / |M| */
int switch_loss_backward(float *dlogits, double dloss, const float *logits, const uint8_t *mask,
                         int T, int E, int k, int counts)
{
    if (check_switch(T, E, k, counts)) return DAMEX_EINVAL;
    double *sums = malloc(2 * (size_t)E * sizeof(double));
    if (!sums) return DAMEX_ENOMEM;
    int st = switch_sums(sums, 0, logits, mask, T, E, k, counts);
    long n = count_valid(mask, T);
    if (st || n == 0) {
        free(sums);
        return st;
    }
    double kk = counts == DAMEX_COUNTS_TOPK ? k : 1;
    int nb = nblocks(T);
    scratch s;
    if (scratch_alloc(&s, nb, E, E)) {
        free(sums);
        return DAMEX_ENOMEM;
    }
    float *af = (float *)s.part;
    for (int i = 0; i < E; i++) af[i] = (float)(dloss * E * sums[i] / (kk * (double)n * (double)n));
#pragma omp parallel for schedule(static) if ((long)T * E >= PAR_WORK)
    for (int b = 0; b < nb; b++) {
        float *q = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            load_row(q, logits + o, NULL, E);
            softmax_inplace(q, E);
            float dot = 0.0f;
            for (int i = 0; i < E; i++) dot += q[i] * af[i];
            for (int i = 0; i < E; i++) dlogits[o + i] += q[i] * (af[i] - dot);
        }
    }
    scratch_free(&s);
    free(sums);
    return DAMEX_OK;
}

/* ---- router z-loss (ST-MoE) and DAMEX loss ---------------------------- */

/* One pass over the unmasked tokens: sum of per-token values (z: lse^2;
 * damex: lse - g_target) and, with dlogits, the per-token gradient scaled by
 * scale = dloss / |M|.  target == NULL selects the z-loss. */
static int lse_pass(double *total, float *dlogits, double scale, const float *logits,
                    const int64_t *target, const uint8_t *mask, int T, int E)
{
    int nb = nblocks(T), bad = 0, badidx = 0;
    scratch s;
    if (scratch_alloc(&s, nb, 1, E)) return DAMEX_ENOMEM;
    float sc = (float)scale;
#pragma omp parallel for schedule(static) reduction(| : bad, badidx) if ((long)T * E >= PAR_WORK)
    for (int b = 0; b < nb; b++) {
        double acc = 0.0;
        float *q = s.row + (size_t)b * E;
        int t1 = (b + 1) * BLOCK < T ? (b + 1) * BLOCK : T;
        for (int t = b * BLOCK; t < t1; t++) {
            if (!is_valid(mask, t)) continue;
            size_t o = (size_t)t * E;
            int64_t y = target ? target[t] : 0;
            if (y < 0 || y >= E) {
                badidx = 1;
                continue;
            }
            if (!load_row(q, logits + o, NULL, E)) {
                bad = 1;
                continue;
            }
            float lse = softmax_inplace(q, E);
            if (target) {
                acc += (double)lse - (double)logits[o + y];
                if (dlogits) {
                    for (int i = 0; i < E; i++) dlogits[o + i] += sc * q[i];
                    dlogits[o + y] -= sc;
                }
            } else {
                acc += (double)lse * (double)lse;
                if (dlogits) {
                    float c = 2.0f * sc * lse;
                    for (int i = 0; i < E; i++) dlogits[o + i] += c * q[i];
                }
            }
        }
        s.part[b] = acc;
    }
    double sum = 0.0;
    for (int b = 0; b < nb; b++) sum += s.part[b];
    *total = sum;
    scratch_free(&s);
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
 * dg_i(x) += dloss * 2 lse(x) q_i(x) / |M| */
int z_loss_backward(float *dlogits, double dloss, const float *logits, const uint8_t *mask, int T,
                    int E)
{
    if (T < 0 || E < 1) return DAMEX_EINVAL;
    long n = count_valid(mask, T);
    if (n == 0) return DAMEX_OK;
    double sum;
    return lse_pass(&sum, dlogits, dloss / (double)n, logits, NULL, mask, T, E);
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
 * dg_i(x) += dloss * (q_i(x) - [i == y(x)]) / |M| */
int damex_loss_backward(float *dlogits, double dloss, const float *logits,
                        const int64_t *expert_target, const uint8_t *mask, int T, int E)
{
    if (T < 0 || E < 1) return DAMEX_EINVAL;
    long n = count_valid(mask, T);
    if (n == 0) return DAMEX_OK;
    double sum;
    return lse_pass(&sum, dlogits, dloss / (double)n, logits, expert_target, mask, T, E);
}
