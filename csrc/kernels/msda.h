/* Multi-scale deformable attention (Deformable-DETR / DINO), forward and backward.
 *
 * Shapes: value[N,S,M,D] (S = sum_l H_l W_l tokens of all levels, M heads, D per head),
 * spatial_shapes[L,2] = (H_l, W_l), level_start[L] = exclusive cumsum of H_l W_l,
 * loc[N,Lq,M,L,P,2] = (x, y) in [0,1] map coordinates, attw[N,Lq,M,L,P],
 * out[N,Lq,M,D].
 *
 * Sampling is grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False):
 * pixel x = loc_x * W - 0.5, y = loc_y * H - 0.5; each of the four corners outside the
 * map reads 0 (and receives no gradient); the location gradient is grid_sample's,
 * including points partly or wholly off the map.  Non-finite locations sample nothing. */
#ifndef DAMEX_MSDA_H
#define DAMEX_MSDA_H

#include <stdint.h>

/* 0 when spatial_shapes / level_start describe S tokens (every H, W >= 1,
 * sum H W == S, level_start the exclusive cumsum), else DAMEX_EINVAL. */
int ms_deform_attn_check_levels(const int64_t *spatial_shapes, const int64_t *level_start, int L,
                                long S);

/* out[n,q,m,:] = sum_{l,p} attw[n,q,m,l,p] * bilinear(value[n, level l, m, :], loc[n,q,m,l,p]) */
int ms_deform_attn_forward(float *out, const float *value, const int64_t *spatial_shapes,
                           const int64_t *level_start, const float *loc, const float *attw, int N,
                           int S, int M, int D, int Lq, int L, int P);

/* Inverts the forward line above; accumulates into zeroed dvalue[N,S,M,D],
 * dloc[N,Lq,M,L,P,2], dattw[N,Lq,M,L,P]. */
int ms_deform_attn_backward(float *dvalue, float *dloc, float *dattw,
                            const float *dy, const float *value,
                            const int64_t *spatial_shapes, const int64_t *level_start,
                            const float *loc, const float *attw, int N, int S, int M, int D,
                            int Lq, int L, int P);

#endif
