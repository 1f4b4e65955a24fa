/* Box ops and detection losses (see box.h).
 *
 * The forward box arithmetic is float32 in DETR's order of operations, so the
 * values match DETR's util/box_ops.py on PyTorch bit for bit where no
 * division by zero occurs.  Backward passes redo the float32 forward (so every
 * branch - clamp, min/max tie - is decided exactly as in the
 * forward) and carry the gradient arithmetic in double.  Subgradients follow
 * PyTorch autograd: clamp(v, min=0) passes the gradient where v >= 0, and
 * max/min split it evenly between two equal arguments.
 *
 * Epsilons.  As DINO's util/box_ops.py, the union and the enclosing area get
 * 1e-6 added (in float32) before they divide:
 *   iou  = inter / (union + 1e-6)
 *   giou = iou - (C - union) / (C + 1e-6)
 * so zero-area boxes (points, segments) give finite values: two coincident
 * points have IoU 0 and GIoU 0. */
#include "box.h"

#include <math.h>

#include "parallel.h"
#include "status.h"

/* Parity with PyTorch needs every float32 product rounded on its own. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

/* ---- format conversions ------------------------------------------------ */

/* b[n,4] cxcywh -> out[n,4] xyxy:
 *   out = (cx - 0.5 w, cy - 0.5 h, cx + 0.5 w, cy + 0.5 h) */
int box_cxcywh_to_xyxy_forward(float *out, const float *b, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        const float *s = b + 4 * i;
        float *o = out + 4 * i;
        o[0] = s[0] - 0.5f * s[2];
        o[1] = s[1] - 0.5f * s[3];
        o[2] = s[0] + 0.5f * s[2];
        o[3] = s[1] + 0.5f * s[3];
    }
    return DAMEX_OK;
}

/* inverts out = (cx - 0.5 w, cy - 0.5 h, cx + 0.5 w, cy + 0.5 h):
 *   dcx = dx0 + dx1, dcy = dy0 + dy1, dw = 0.5 (dx1 - dx0), dh = 0.5 (dy1 - dy0) */
int box_cxcywh_to_xyxy_backward(float *db, const float *dy, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        const float *d = dy + 4 * i;
        float *g = db + 4 * i;
        g[0] += d[0] + d[2];
        g[1] += d[1] + d[3];
        g[2] += 0.5f * d[2] - 0.5f * d[0];
        g[3] += 0.5f * d[3] - 0.5f * d[1];
    }
    return DAMEX_OK;
}

/* b[n,4] xyxy -> out[n,4] cxcywh:
 *   out = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0) */
int box_xyxy_to_cxcywh_forward(float *out, const float *b, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        const float *s = b + 4 * i;
        float *o = out + 4 * i;
        o[0] = (s[0] + s[2]) / 2.0f;
        o[1] = (s[1] + s[3]) / 2.0f;
        o[2] = s[2] - s[0];
        o[3] = s[3] - s[1];
    }
    return DAMEX_OK;
}

/* inverts out = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0):
 *   dx0 = dcx / 2 - dw, dx1 = dcx / 2 + dw (y likewise) */
int box_xyxy_to_cxcywh_backward(float *db, const float *dy, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        const float *d = dy + 4 * i;
        float *g = db + 4 * i;
        g[0] += d[0] / 2.0f - d[2];
        g[1] += d[1] / 2.0f - d[3];
        g[2] += d[0] / 2.0f + d[2];
        g[3] += d[1] / 2.0f + d[3];
    }
    return DAMEX_OK;
}

/* ---- IoU and generalized IoU -------------------------------------------- */

/* DINO's epsilon on the union and the enclosing area (float32, as torch adds it). */
#define BOX_EPS 1e-6f

/* The float32 forward of one pair, in DETR's order of operations. */
struct giou_pair {
    float area_a, area_b;
    float iw, ih;         /* rb - lt of the intersection, before the clamp */
    float inter, uni;     /* intersection and union areas */
    float cw, ch;         /* extent of the enclosing box, before the clamp */
    float encl;           /* enclosing area C */
};

static inline void giou_pair_forward(struct giou_pair *p, const float *a, const float *b)
{
    p->area_a = (a[2] - a[0]) * (a[3] - a[1]);
    p->area_b = (b[2] - b[0]) * (b[3] - b[1]);
    p->iw = fminf(a[2], b[2]) - fmaxf(a[0], b[0]);
    p->ih = fminf(a[3], b[3]) - fmaxf(a[1], b[1]);
    p->inter = (p->iw > 0.0f ? p->iw : 0.0f) * (p->ih > 0.0f ? p->ih : 0.0f);
    p->uni = (p->area_a + p->area_b) - p->inter;
    p->cw = fmaxf(a[2], b[2]) - fminf(a[0], b[0]);
    p->ch = fmaxf(a[3], b[3]) - fminf(a[1], b[1]);
    p->encl = (p->cw > 0.0f ? p->cw : 0.0f) * (p->ch > 0.0f ? p->ch : 0.0f);
}

static inline float iou_of(const struct giou_pair *p)
{
    return p->inter / (p->uni + BOX_EPS);
}

static inline float giou_of(const struct giou_pair *p)
{
    float pen = (p->encl - p->uni) / (p->encl + BOX_EPS);
    return iou_of(p) - pen;
}

/* a[N,4], b[M,4] xyxy -> iou[N,M], union[N,M]:
 *   inter = clamp(min(ax1,bx1) - max(ax0,bx0), 0) * clamp(min(ay1,by1) - max(ay0,by0), 0)
 *   union = (area(a) + area(b)) - inter
 *   iou   = inter / (union + 1e-6) */
int box_iou_forward(float *iou, float *union_area, const float *a, const float *b, int N, int M)
{
    if (N < 0 || M < 0) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if ((long)N * M > PAR_MIN_BOX_PAIRS)
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < M; j++) {
            struct giou_pair p;
            giou_pair_forward(&p, a + 4 * i, b + 4 * j);
            iou[(long)i * M + j] = iou_of(&p);
            union_area[(long)i * M + j] = p.uni;
        }
    }
    return DAMEX_OK;
}

/* a[N,4], b[M,4] xyxy -> giou[N,M]:
 *   iou as in box_iou_forward
 *   C    = clamp(max(ax1,bx1) - min(ax0,bx0), 0) * clamp(max(ay1,by1) - min(ay0,by0), 0)
 *   giou = iou - (C - union) / (C + 1e-6) */
int generalized_box_iou_forward(float *giou, const float *a, const float *b, int N, int M)
{
    if (N < 0 || M < 0) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if ((long)N * M > PAR_MIN_BOX_PAIRS)
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < M; j++) {
            struct giou_pair p;
            giou_pair_forward(&p, a + 4 * i, b + 4 * j);
            giou[(long)i * M + j] = giou_of(&p);
        }
    }
    return DAMEX_OK;
}

/* Gradient g of y = max(u, v) (want_max) or min(u, v) to u and v, split
 * evenly at a tie (torch.maximum / torch.minimum). */
static inline void minmax_grad(double g, float u, float v, int want_max, double *gu, double *gv)
{
    if (u == v) {
        *gu += 0.5 * g;
        *gv += 0.5 * g;
    } else if ((u > v) == (want_max != 0)) {
        *gu += g;
    } else {
        *gv += g;
    }
}

/* d giou(a, b) / d(a, b) times g, into ga[4], gb[4] (overwritten). */
static void giou_pair_backward(double ga[4], double gb[4], double g, const float *a,
                               const float *b)
{
    struct giou_pair p;
    giou_pair_forward(&p, a, b);
    for (int k = 0; k < 4; k++) ga[k] = gb[k] = 0.0;
    double g_inter = 0.0, g_union = 0.0, g_encl = 0.0;
    /* iou = inter / (union + eps) */
    double u = (double)(p.uni + BOX_EPS), e = (double)(p.encl + BOX_EPS);
    g_inter += g / u;
    g_union -= g * p.inter / (u * u);
    /* giou = iou - (C - union) / (C + eps) */
    g_union += g / e;
    g_encl += -g / e + g * ((double)p.encl - p.uni) / (e * e);
    /* union = (area(a) + area(b)) - inter */
    double g_area = g_union;
    g_inter -= g_union;
    /* area(a) = (ax1 - ax0) * (ay1 - ay0) */
    double wa = (double)a[2] - a[0], ha = (double)a[3] - a[1];
    double wb = (double)b[2] - b[0], hb = (double)b[3] - b[1];
    ga[2] += g_area * ha; ga[0] -= g_area * ha;
    ga[3] += g_area * wa; ga[1] -= g_area * wa;
    gb[2] += g_area * hb; gb[0] -= g_area * hb;
    gb[3] += g_area * wb; gb[1] -= g_area * wb;
    /* inter = clamp(iw, 0) * clamp(ih, 0),  iw = min(ax1,bx1) - max(ax0,bx0) */
    double iw = p.iw > 0.0f ? p.iw : 0.0f, ih = p.ih > 0.0f ? p.ih : 0.0f;
    if (p.iw >= 0.0f) {
        double g_iw = g_inter * ih;
        minmax_grad(g_iw, a[2], b[2], 0, &ga[2], &gb[2]);
        minmax_grad(-g_iw, a[0], b[0], 1, &ga[0], &gb[0]);
    }
    if (p.ih >= 0.0f) {
        double g_ih = g_inter * iw;
        minmax_grad(g_ih, a[3], b[3], 0, &ga[3], &gb[3]);
        minmax_grad(-g_ih, a[1], b[1], 1, &ga[1], &gb[1]);
    }
    /* C = clamp(cw, 0) * clamp(ch, 0),  cw = max(ax1,bx1) - min(ax0,bx0) */
    double cw = p.cw > 0.0f ? p.cw : 0.0f, ch = p.ch > 0.0f ? p.ch : 0.0f;
    if (p.cw >= 0.0f) {
        double g_cw = g_encl * ch;
        minmax_grad(g_cw, a[2], b[2], 1, &ga[2], &gb[2]);
        minmax_grad(-g_cw, a[0], b[0], 0, &ga[0], &gb[0]);
    }
    if (p.ch >= 0.0f) {
        double g_ch = g_encl * cw;
        minmax_grad(g_ch, a[3], b[3], 1, &ga[3], &gb[3]);
        minmax_grad(-g_ch, a[1], b[1], 0, &ga[1], &gb[1]);
    }
}

/* inverts giou[i,j] = iou - (C - union) / (C + 1e-6) (generalized_box_iou_forward):
 *   da[i] += sum_j dy[i,j] d giou[i,j] / d a[i],  db[j] += sum_i dy[i,j] d giou[i,j] / d b[j]
 * Two passes, over rows of a and over rows of b, so that threads own disjoint
 * outputs and the sums run in a fixed order. */
int generalized_box_iou_backward(float *da, float *db, const float *dy, const float *a,
                                 const float *b, int N, int M)
{
    if (N < 0 || M < 0) return DAMEX_EINVAL;
    int par = (long)N * M > PAR_MIN_BOX_PAIRS_BACKWARD;
#pragma omp parallel for schedule(static) if (par)
    for (int i = 0; i < N; i++) {
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        for (int j = 0; j < M; j++) {
            double g = dy[(long)i * M + j];
            if (g == 0.0) continue;
            double ga[4], gb[4];
            giou_pair_backward(ga, gb, g, a + 4 * i, b + 4 * j);
            for (int k = 0; k < 4; k++) acc[k] += ga[k];
        }
        for (int k = 0; k < 4; k++) da[4 * i + k] += (float)acc[k];
    }
#pragma omp parallel for schedule(static) if (par)
    for (int j = 0; j < M; j++) {
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        for (int i = 0; i < N; i++) {
            double g = dy[(long)i * M + j];
            if (g == 0.0) continue;
            double ga[4], gb[4];
            giou_pair_backward(ga, gb, g, a + 4 * i, b + 4 * j);
            for (int k = 0; k < 4; k++) acc[k] += gb[k];
        }
        for (int k = 0; k < 4; k++) db[4 * j + k] += (float)acc[k];
    }
    return DAMEX_OK;
}

/* a[n,4], b[n,4] xyxy -> giou[n] = giou(a[i], b[i]), the formula of
 * generalized_box_iou_forward on matched pairs (the loss needs only these) */
int generalized_box_iou_paired_forward(float *giou, const float *a, const float *b, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        struct giou_pair p;
        giou_pair_forward(&p, a + 4 * i, b + 4 * i);
        giou[i] = giou_of(&p);
    }
    return DAMEX_OK;
}

/* inverts giou[i] = iou - (C - union) / (C + 1e-6) on pair (a[i], b[i]):
 *   da[i] += dy[i] d giou[i] / d a[i],  db[i] += dy[i] d giou[i] / d b[i] */
int generalized_box_iou_paired_backward(float *da, float *db, const float *dy, const float *a,
                                        const float *b, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        double ga[4], gb[4];
        giou_pair_backward(ga, gb, dy[i], a + 4 * i, b + 4 * i);
        for (int k = 0; k < 4; k++) {
            da[4 * i + k] += (float)ga[k];
            db[4 * i + k] += (float)gb[k];
        }
    }
    return DAMEX_OK;
}

/* ---- sigmoid focal loss ------------------------------------------------- */

/* The pieces of the focal loss at logit x, target t, in double:
 * p = sigmoid(x) and q = 1 - p without cancellation, ce = BCE with logits. */
static inline void focal_parts(double x, double t, double *p, double *q, double *ce)
{
    double e = exp(-fabs(x));
    double inv = 1.0 / (1.0 + e);
    *p = x >= 0.0 ? inv : e * inv;
    *q = x >= 0.0 ? e * inv : inv;
    *ce = (x > 0.0 ? x : 0.0) - x * t + log1p(e);
}

static inline double focal_weight(double t, double alpha)
{
    return alpha < 0.0 ? 1.0 : alpha * t + (1.0 - alpha) * (1.0 - t);
}

static inline double pow_gamma(double m, double gamma)
{
    if (gamma == 2.0) return m * m;
    if (gamma == 1.0) return m;
    if (gamma == 0.0) return 1.0;
    return pow(m, gamma);
}

/* loss[n] = w ce m^gamma  (torchvision sigmoid_focal_loss, reduction "none"):
 *   p  = sigmoid(x),  ce = max(x, 0) - x t + log1p(exp(-|x|))
 *   m  = 1 - p_t = p (1 - t) + (1 - p) t
 *   w  = alpha t + (1 - alpha)(1 - t), or 1 where alpha < 0
 * computed in double from p and 1 - p, so large |x| loses nothing. */
int sigmoid_focal_loss_forward(float *loss, const float *x, const float *t, long n, float alpha,
                               float gamma)
{
    if (n < 0 || !(gamma >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i++) {
        double p, q, ce, ti = t[i];
        focal_parts(x[i], ti, &p, &q, &ce);
        double m = p * (1.0 - ti) + q * ti;
        loss[i] = (float)(focal_weight(ti, alpha) * ce * pow_gamma(m, gamma));
    }
    return DAMEX_OK;
}

/* inverts loss = w ce m^gamma (sigmoid_focal_loss_forward):
 *   dce/dx = p - t = p (1 - t) - (1 - p) t,   dm/dx = p (1 - p)(1 - 2t)
 *   dx += dy w [(p - t) m^gamma + ce gamma m^(gamma-1) p (1 - p)(1 - 2t)]
 * where the second term is 0 for gamma == 0 or m == 0 (its limit for
 * gamma >= 1; PyTorch's pow backward is 0 there too for gamma == 0). */
int sigmoid_focal_loss_backward(float *dx, const float *dy, const float *x, const float *t,
                                long n, float alpha, float gamma)
{
    if (n < 0 || !(gamma >= 0.0f)) return DAMEX_EINVAL;
#pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMENTWISE)
    for (long i = 0; i < n; i++) {
        double p, q, ce, ti = t[i];
        focal_parts(x[i], ti, &p, &q, &ce);
        double m = p * (1.0 - ti) + q * ti;
        double d = (p * (1.0 - ti) - q * ti) * pow_gamma(m, gamma);
        if (gamma != 0.0f && m > 0.0)
            d += ce * gamma * pow_gamma(m, gamma - 1.0) * p * q * (1.0 - 2.0 * ti);
        dx[i] += (float)(dy[i] * focal_weight(ti, alpha) * d);
    }
    return DAMEX_OK;
}

/* ---- L1 ----------------------------------------------------------------- */

/* out[n] = |a[n] - b[n]| */
int l1_loss_forward(float *out, const float *a, const float *b, long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) out[i] = fabsf(a[i] - b[i]);
    return DAMEX_OK;
}

/* inverts out = |a - b|:  da += dy sign(a - b),  db -= dy sign(a - b),
 * with sign(0) = 0 (the subgradient PyTorch's abs uses) */
int l1_loss_backward(float *da, float *db, const float *dy, const float *a, const float *b,
                     long n)
{
    if (n < 0) return DAMEX_EINVAL;
    for (long i = 0; i < n; i++) {
        float d = a[i] - b[i];
        float s = d > 0.0f ? dy[i] : (d < 0.0f ? -dy[i] : 0.0f);
        da[i] += s;
        db[i] -= s;
    }
    return DAMEX_OK;
}
