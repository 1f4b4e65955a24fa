/* Embedding lookup and its scatter-add backward. */
#include "embedding.h"

#include <string.h>

#include "status.h"
#include "parallel.h"

static int ids_in_range(const int64_t *ids, long n, long V)
{
    for (long i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V) return 0;
    return 1;
}

int embedding_forward(float *out, const float *weight, const int64_t *ids, long n, long V,
                      long D)
{
    if (n < 0 || V < 0 || D < 0) return DAMEX_EINVAL;
    if (!ids_in_range(ids, n, V)) return DAMEX_EINDEX;
#pragma omp parallel for schedule(static) if (n * D > PAR_MIN_ROWS)
    for (long i = 0; i < n; i++) memcpy(out + i * D, weight + ids[i] * D, sizeof(float) * D);
    return DAMEX_OK;
}

int embedding_backward(float *dweight, const float *dy, const int64_t *ids, long n, long V,
                       long D)
{
    if (n < 0 || V < 0 || D < 0) return DAMEX_EINVAL;
    if (!ids_in_range(ids, n, V)) return DAMEX_EINDEX;
    const long blk = 64;
    const long nblk = (D + blk - 1) / blk;
#pragma omp parallel for schedule(static) if (n * D > PAR_MIN_ROWS)
    for (long b = 0; b < nblk; b++) {
        long d0 = b * blk, d1 = d0 + blk < D ? d0 + blk : D;
        for (long i = 0; i < n; i++) {
            float *dst = dweight + ids[i] * D;
            const float *src = dy + i * D;
            for (long d = d0; d < d1; d++) dst[d] += src[d];
        }
    }
    return DAMEX_OK;
}
