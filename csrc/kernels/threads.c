/* Thread control: the stored counts (threads.h) and the OpenBLAS-one-thread
 * bracket around OpenMP regions that call sgemm (blas.h). */
#include "threads.h"

#include <pthread.h>
#include <unistd.h>

#include "blas.h"
#include "status.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Guards the stored counts and every call of OpenBLAS's set_num_threads. */
static pthread_mutex_t threads_mutex = PTHREAD_MUTEX_INITIALIZER;
static int blas_threads = 1, cpus = 1;
static int omp_threads = 1; /* read without the mutex: __atomic */
static int blas_users = 0;  /* callers inside the bracket */

void damex_threads_init(void)
{
    pthread_mutex_lock(&threads_mutex);
#ifdef _OPENMP
    cpus = omp_get_num_procs(); /* the affinity mask at start-up (libgomp) */
    __atomic_store_n(&omp_threads, omp_get_max_threads(), __ATOMIC_RELAXED);
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cpus = n > 0 ? (int)n : 1;
#endif
    if (cpus < 1) cpus = 1;
    blas_threads = DAMEX_OPENBLAS(get_num_threads)();
    pthread_mutex_unlock(&threads_mutex);
}

int damex_threads_cpus(void) { return cpus; }

int damex_threads_max(void) { return 4 * cpus; }

int damex_threads_set(int n)
{
    if (n < 1 || n > damex_threads_max()) return DAMEX_EINVAL;
    pthread_mutex_lock(&threads_mutex);
    blas_threads = n;
    __atomic_store_n(&omp_threads, n, __ATOMIC_RELAXED);
    /* inside a bracket OpenBLAS stays at one thread; the last end applies n */
    if (blas_users == 0) DAMEX_OPENBLAS(set_num_threads)(n);
    pthread_mutex_unlock(&threads_mutex);
    return DAMEX_OK;
}

void damex_threads_get(int *blas, int *omp)
{
    pthread_mutex_lock(&threads_mutex);
    *blas = blas_threads;
    pthread_mutex_unlock(&threads_mutex);
    *omp = __atomic_load_n(&omp_threads, __ATOMIC_RELAXED);
}

void damex_threads_enter(void)
{
#ifdef _OPENMP
    int n = __atomic_load_n(&omp_threads, __ATOMIC_RELAXED);
    if (omp_get_max_threads() != n) omp_set_num_threads(n);
#endif
}

/* One OpenBLAS thread while any caller is inside; then the stored count (not a
 * count saved at the start, which a concurrent set would make stale). */
void blas_single_thread_begin(void)
{
#ifdef _OPENMP
    pthread_mutex_lock(&threads_mutex);
    if (blas_users++ == 0 && blas_threads != 1) DAMEX_OPENBLAS(set_num_threads)(1);
    pthread_mutex_unlock(&threads_mutex);
#endif
}

void blas_single_thread_end(void)
{
#ifdef _OPENMP
    pthread_mutex_lock(&threads_mutex);
    if (--blas_users == 0 && blas_threads != 1) DAMEX_OPENBLAS(set_num_threads)(blas_threads);
    pthread_mutex_unlock(&threads_mutex);
#endif
}
