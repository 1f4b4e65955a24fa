/* Thread control of the damex core (threads.c): the count asked for with
 * damex.set_num_threads is stored once, for the whole process, and bounded.
 *
 * OpenBLAS's count is process-wide; OpenMP's is per thread (omp_set_num_threads
 * sets only the calling thread's), so every entry into a kernel applies the
 * stored count to the calling thread (damex_threads_enter) and every parallel
 * region of that call sees it; a count changed meanwhile by another thread
 * applies from that thread's next call on. */
#ifndef DAMEX_THREADS_H
#define DAMEX_THREADS_H

/* Reads the libraries' start-up counts (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS)
 * and the CPUs the process may use; call once before the others. */
void damex_threads_init(void);

/* The largest count damex_threads_set accepts: 4 x the CPUs the process may use. */
int damex_threads_max(void);

/* The CPUs the process may use (its affinity mask), as read at init. */
int damex_threads_cpus(void);

/* Stores n (1 <= n <= damex_threads_max()) for OpenBLAS and OpenMP; DAMEX_EINVAL otherwise. */
int damex_threads_set(int n);

/* The stored counts: *blas for OpenBLAS, *omp for OpenMP regions. */
void damex_threads_get(int *blas, int *omp);

/* Applies the stored OpenMP count to the calling thread (before a kernel runs). */
void damex_threads_enter(void);

#endif
