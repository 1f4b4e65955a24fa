/* CPU dispatch at run time: the one condition under which damex compiles
 * per-CPU code, and the clone sets built under it.
 *
 * DAMEX_X86: GCC >= 11 (not clang, whose target_clones differ; 11 for the
 * x86-64-v3/v4 level names) on x86-64.  There the kernels below carry
 * target_clones (GCC emits each listed variant and an ifunc resolver picks
 * one when the library loads, by the CPU), and the conv kernels compile
 * their AVX-512 intrinsics, entered only where __builtin_cpu_supports says
 * so (conv2d_direct_preferred).  Elsewhere everything is the portable build.
 *
 * DAMEX_CLONES        avx512f | avx2 | default: the elementwise and row loops.
 * DAMEX_CLONES_FMA    x86-64-v4 | x86-64-v3 | default: the router's narrow
 *                     GEMM, where FMA matters (the "avx2" clone lacks it).
 * DAMEX_CLONES_AVX512 avx512f | default: the conv blocked kernels, written
 *                     for 16-float vectors (an AVX2 clone gains nothing). */
#ifndef DAMEX_CPU_H
#define DAMEX_CPU_H

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define DAMEX_X86 1
#define DAMEX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DAMEX_CLONES_FMA \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DAMEX_CLONES_AVX512 __attribute__((target_clones("avx512f", "default")))
#else
#define DAMEX_CLONES
#define DAMEX_CLONES_FMA
#define DAMEX_CLONES_AVX512
#endif

#endif
