/* 2-D convolution, NCHW, groups = 1, no dilation, by one of four algorithms:
 * two on OpenBLAS's sgemm (conv_im2col.c, conv_shifted.c) and two on damex's
 * own register-blocked kernel (conv_direct.c, conv_winograd.c); conv.c picks
 * one for the forward, conv_backward.c for the backward. */
#ifndef DAMEX_CONV_H
#define DAMEX_CONV_H

struct conv2d_shape {
    int N, Cin, H, W;   /* input x[N,Cin,H,W]                    */
    int Cout, kh, kw;   /* weight w[Cout,Cin,kh,kw]              */
    int sh, sw, ph, pw; /* stride >= 1, zero padding >= 0        */
    int Ho, Wo;         /* output y[N,Cout,Ho,Wo], set by _init  */
    int algorithm;      /* enum conv2d_algorithm */
};

/* AUTO: a 1x1 stride-1 unpadded conv multiplies x directly (IM2COL without a copy).
 * Other convs with output planes of CONV2D_OWN_MIN_PIXELS or more, where the
 * CPU has AVX-512, run on damex's own kernels: the forward on WINOGRAD for 3x3
 * at stride 1 with Cin >= CONV2D_WINOGRAD_MIN_CIN, else DIRECT; the backward
 * as conv.c says.  Otherwise SHIFTED when Cin >= CONV2D_SHIFTED_MIN_CIN, else
 * IM2COL.  DIRECT and WINOGRAD are forward algorithms: their backward is
 * SHIFTED's. */
enum conv2d_algorithm {
    CONV2D_AUTO = 0,
    CONV2D_IM2COL = 1,
    CONV2D_SHIFTED = 2,
    CONV2D_DIRECT = 3,
    CONV2D_WINOGRAD = 4
};
#define CONV2D_WINOGRAD_MIN_CIN 8
#define CONV2D_OWN_MIN_PIXELS 512
#define CONV2D_SHIFTED_MIN_CIN 16

/* Checks the sizes and sets Ho = (H + 2 ph - kh) / sh + 1 (and Wo); returns
 * DAMEX_EINVAL if any size is out of range or the output would be empty. */
int conv2d_shape_init(struct conv2d_shape *s);

/* y[n,co,oh,ow] = b[co] + sum_{ci,i,j} w[co,ci,i,j] * x[n,ci,oh*sh-ph+i,ow*sw-pw+j]
 * (x is 0 outside the image; b may be NULL).
 * IM2COL, per image:  y[n] = w[Cout,K] @ col[K,P],  K = Cin*kh*kw, P = Ho*Wo.
 * SHIFTED, per image: y[n] = sum over taps (i,j) of w[:,:,i,j] @ (x[n] shifted by (i,j)).
 * DIRECT: the same sum by a register-blocked kernel of damex's own (conv_direct.c).
 * WINOGRAD (3x3, stride 1 only, else DAMEX_EINVAL): F(2x2, 3x3) tiles (conv_winograd.c). */
int conv2d_forward(float *y, const float *x, const float *w, const float *b,
                   const struct conv2d_shape *s);

/* Inverts  y[n] = w @ col(x[n]) + b:
 *   dw[Cout,K] += dy[n] @ col(x[n])^T;   dx[n] += col2im(w^T @ dy[n]);   db += sum_{n,p} dy
 * (SHIFTED: the same per tap, see conv_shifted.c)
 * Any of dx, dw, db may be NULL (not wanted). */
int conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, const struct conv2d_shape *s);

#endif
