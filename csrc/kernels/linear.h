/* Fully connected layer with PyTorch's weight layout w[Dout, Din]. */
#ifndef DAMEX_LINEAR_H
#define DAMEX_LINEAR_H

/* y[N,Dout] = x[N,Din] @ w[Dout,Din]^T + b[Dout]     (b may be NULL) */
int linear_forward(float *y, const float *x, const float *w, const float *b, int N, int Din,
                   int Dout);

/* Inverts  y = x @ w^T + b:
 *   dx[N,Din]    += dy[N,Dout] @ w[Dout,Din]
 *   dw[Dout,Din] += dy^T[Dout,N] @ x[N,Din]
 *   db[Dout]     += sum_n dy[n,:]
 * Any of dx, dw, db may be NULL (not wanted). */
int linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, int N, int Din, int Dout);

/* out[C] += sum over rows of a[R,C]: column sums, parallel over column blocks. */
void column_sums_accumulate(float *out, const float *a, long R, long C);

#endif
