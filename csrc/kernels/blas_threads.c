/* Switching OpenBLAS to one thread around an OpenMP region (see blas.h). */
#include "blas.h"

#ifdef _OPENMP
#include <pthread.h>
static pthread_mutex_t blas_mutex = PTHREAD_MUTEX_INITIALIZER;
static int blas_users = 0, blas_saved = 1;
#endif

void blas_single_thread_begin(void)
{
#ifdef _OPENMP
    pthread_mutex_lock(&blas_mutex);
    if (blas_users++ == 0) {
        blas_saved = DAMEX_OPENBLAS(get_num_threads)();
        if (blas_saved != 1) DAMEX_OPENBLAS(set_num_threads)(1);
    }
    pthread_mutex_unlock(&blas_mutex);
#endif
}

void blas_single_thread_end(void)
{
#ifdef _OPENMP
    pthread_mutex_lock(&blas_mutex);
    if (--blas_users == 0 && blas_saved != 1) DAMEX_OPENBLAS(set_num_threads)(blas_saved);
    pthread_mutex_unlock(&blas_mutex);
#endif
}
