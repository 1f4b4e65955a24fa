/* Masked multi-head scaled dot-product attention (the decoder self-attention
 * of DINO, with the contrastive-denoising mask). */
#ifndef DAMEX_ATTENTION_H
#define DAMEX_ATTENTION_H

#include <stdint.h>

int attention_forward(float *out, float *attn, const float *q, const float *k, const float *v,
                      const uint8_t *attn_mask, const uint8_t *key_padding_mask, int N, int Lq,
                      int Lk, int C, int H);

int attention_backward(float *dq, float *dk, float *dv, const float *dy, const float *attn,
                       const float *q, const float *k, const float *v, int N, int Lq, int Lk,
                       int C, int H);

#endif
