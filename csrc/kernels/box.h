/* Box ops and the detection losses of the DINO criterion: box format
 * conversions, pairwise IoU / generalized IoU (DETR util/box_ops.py), the
 * sigmoid focal loss (torchvision) and the elementwise L1 loss.
 * Boxes are rows of 4 contiguous floats; xyxy = (x0, y0, x1, y1),
 * cxcywh = (cx, cy, w, h). */
#ifndef DAMEX_BOX_H
#define DAMEX_BOX_H

/* out[n,4] = xyxy(b[n,4] as cxcywh) */
int box_cxcywh_to_xyxy_forward(float *out, const float *b, long n);
/* db[n,4] += d/db of the forward, given dy[n,4] */
int box_cxcywh_to_xyxy_backward(float *db, const float *dy, long n);

/* out[n,4] = cxcywh(b[n,4] as xyxy) */
int box_xyxy_to_cxcywh_forward(float *out, const float *b, long n);
int box_xyxy_to_cxcywh_backward(float *db, const float *dy, long n);

/* iou[N,M], union[N,M] of xyxy boxes a[N,4], b[M,4] */
int box_iou_forward(float *iou, float *union_area, const float *a, const float *b, int N, int M);

/* giou[N,M] of xyxy boxes a[N,4], b[M,4] */
int generalized_box_iou_forward(float *giou, const float *a, const float *b, int N, int M);
/* da[N,4] += dy-weighted d giou / da, db[M,4] likewise */
int generalized_box_iou_backward(float *da, float *db, const float *dy, const float *a,
                                 const float *b, int N, int M);

/* giou[n] of matched pairs: giou(a[i], b[i]) for xyxy a[n,4], b[n,4] (the diagonal
 * of the pairwise matrix, without the n x n work) */
int generalized_box_iou_paired_forward(float *giou, const float *a, const float *b, long n);
/* da[n,4], db[n,4] += dy[i] d giou(a[i], b[i]) / d(a[i], b[i]) */
int generalized_box_iou_paired_backward(float *da, float *db, const float *dy, const float *a,
                                        const float *b, long n);

/* loss[n] = focal(x[n], t[n]); alpha < 0 disables the alpha weighting; gamma >= 0 */
int sigmoid_focal_loss_forward(float *loss, const float *x, const float *t, long n, float alpha,
                               float gamma);
int sigmoid_focal_loss_backward(float *dx, const float *dy, const float *x, const float *t,
                                long n, float alpha, float gamma);

/* out[n] = |a[n] - b[n]| */
int l1_loss_forward(float *out, const float *a, const float *b, long n);
int l1_loss_backward(float *da, float *db, const float *dy, const float *a, const float *b,
                     long n);

#endif
