/* 2-D convolution, NCHW, groups = 1, no dilation: im2col + one sgemm per image
 * (no copy at all for a 1x1 stride-1 unpadded convolution). */
#ifndef DAMEX_CONV_H
#define DAMEX_CONV_H

struct conv2d_shape {
    int N, Cin, H, W;   /* input x[N,Cin,H,W]                    */
    int Cout, kh, kw;   /* weight w[Cout,Cin,kh,kw]              */
    int sh, sw, ph, pw; /* stride >= 1, zero padding >= 0        */
    int Ho, Wo;         /* output y[N,Cout,Ho,Wo], set by _init  */
};

/* Checks the sizes and sets Ho = (H + 2 ph - kh) / sh + 1 (and Wo); returns
 * DAMEX_EINVAL if any size is out of range or the output would be empty. */
int conv2d_shape_init(struct conv2d_shape *s);

/* y[n,co,oh,ow] = b[co] + sum_{ci,i,j} w[co,ci,i,j] * x[n,ci,oh*sh-ph+i,ow*sw-pw+j]
 * (x is 0 outside the image; b may be NULL).  Per image: y[n] = w[Cout,K] @ col[K,P],
 * K = Cin*kh*kw, P = Ho*Wo. */
int conv2d_forward(float *y, const float *x, const float *w, const float *b,
                   const struct conv2d_shape *s);

/* Inverts  y[n] = w @ col(x[n]) + b:
 *   dw[Cout,K] += dy[n] @ col(x[n])^T;   dx[n] += col2im(w^T @ dy[n]);   db += sum_{n,p} dy
 * Any of dx, dw, db may be NULL (not wanted). */
int conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, const struct conv2d_shape *s);

#endif
