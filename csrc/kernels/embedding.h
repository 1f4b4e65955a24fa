/* Embedding lookup: rows of a table picked by int64 ids. */
#ifndef DAMEX_EMBEDDING_H
#define DAMEX_EMBEDDING_H

#include <stdint.h>

/* out[i,:] = weight[ids[i],:]   (weight[V,D], ids[n]; DAMEX_EINDEX if an id is outside [0,V)) */
int embedding_forward(float *out, const float *weight, const int64_t *ids, long n, long V,
                      long D);

/* Inverts out[i,:] = weight[ids[i],:]:  dweight[ids[i],:] += dy[i,:]
 * (threads own disjoint column blocks of dweight, so repeated ids never race) */
int embedding_backward(float *dweight, const float *dy, const int64_t *ids, long n, long V,
                       long D);

#endif
