/* The one place BLAS is named.  scipy-openblas32 prefixes its symbols with
 * scipy_ (scipy_cblas_sgemm); a system OpenBLAS uses the plain names. */
#ifndef DAMEX_BLAS_H
#define DAMEX_BLAS_H

#include <cblas.h>

#ifdef DAMEX_BLAS_SCIPY
#define DAMEX_CBLAS(name) scipy_cblas_##name
#define DAMEX_OPENBLAS(name) scipy_openblas_##name
#else
#define DAMEX_CBLAS(name) cblas_##name
#define DAMEX_OPENBLAS(name) openblas_##name
#endif

/* Row-major C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C.
 * lda/ldb/ldc are the row strides of A, B, C as stored. */
static inline void sgemm_rm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                            const float *A, int lda, const float *B, int ldb, float beta,
                            float *C, int ldc)
{
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* C = beta * C */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(long)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(long)i * ldc + j];
        return;
    }
    DAMEX_CBLAS(sgemm)(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                       trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta,
                       C, ldc);
}

/* OpenBLAS's pthreads pool and OpenMP's must not both spin on the cores: a
 * kernel that runs single-threaded sgemms on OpenMP threads brackets its
 * parallel region with these (threads.c: counted, so concurrent callers stay
 * correct; the end restores the count stored by damex.set_num_threads, which
 * a set during the bracket updates without touching OpenBLAS). */
void blas_single_thread_begin(void);
void blas_single_thread_end(void);

#endif
