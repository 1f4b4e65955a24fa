/* The work sizes from which a kernel forks an OpenMP team: one home, each
 * named by what it counts and why it is where it is.
 *
 * Why thresholds at all: a fork/join costs microseconds on an idle machine,
 * and on a busy one (this project's 2 cores, OpenBLAS's threads still
 * spinning after a GEMM) a region's closing barrier can wait a whole time
 * slice (milliseconds) for a descheduled thread: measured 16 ms instead of
 * 0.1 ms for a routing-loss pass of T*E = 65536.  So a pass forks only when
 * one core would take well over ~0.1 ms.  The values were set by timing each
 * kernel on and off the team; a comparison in a kernel uses one name here. */
#ifndef DAMEX_PARALLEL_H
#define DAMEX_PARALLEL_H

/* Normalisation passes (layer, group, frozen batch norm), elements: two or
 * three reads of each with a sqrt per row or group. */
#define PAR_MIN_NORM (1L << 14)
/* Row passes of a few flops per element (linear bias rows and column sums,
 * softmax rows, embedding gathers, AdamW), elements. */
#define PAR_MIN_ROWS (1L << 15)
/* Elementwise maps (sigmoid, inverse sigmoid, dropout, sigmoid focal loss),
 * elements: one read and one write each, memory-bound. */
#define PAR_MIN_ELEMENTWISE (1L << 16)
/* Box pairs of IoU / GIoU, N*M: a few dozen flops each (forward) and about
 * four times that (the GIoU backward, whose threshold is lower). */
#define PAR_MIN_BOX_PAIRS (1L << 14)
#define PAR_MIN_BOX_PAIRS_BACKWARD (1L << 12)
/* Max-pool: window taps NC*Ho*Wo*kh*kw (forward), outputs NC*Ho*Wo (backward). */
#define PAR_MIN_POOL (1L << 15)
/* Blocks of the sum of squares (optim.c): each block is long already. */
#define PAR_MIN_SSQ_BLOCKS 8
/* Router row passes (softmax + top-k, combine weights) and routing-loss
 * passes, T*E: a pass takes ~0.1-0.2 ms on one core at T=8192, E=8. */
#define PAR_MIN_ROUTER_ROWS (1L << 18)
/* The router's narrow logits GEMM, multiply-adds T*D*(8 or 16). */
#define PAR_MIN_ROUTER_LOGITS (1L << 22)
/* MoE gathers and scatters (dispatch, combine), floats moved: memory-bound,
 * a second thread gains little, only very large ones fork. */
#define PAR_MIN_GATHER (1L << 22)
/* The expert FFN, multiply-adds of one GEMM pass N*D*F. */
#define PAR_MIN_FFN (1L << 21)
/* Attention, multiply-adds N*H*Lq*Lk*d. */
#define PAR_MIN_ATTENTION (1L << 20)
/* MSDA, ~flops N*M*Lq*L*P*(D + 16). */
#define PAR_MIN_MSDA 200000.0
/* The copies around conv's products (im2col, phase planes, crops, bias
 * sums), elements: memory-bound and short, and a forked team keeps spinning
 * into the sgemm that follows, contending with OpenBLAS's own threads (on a
 * loaded 2-core machine that made the 2-thread conv several times slower
 * than 1 thread): only copies of several MB fork. */
#ifndef PAR_MIN_CONV_COPY
#define PAR_MIN_CONV_COPY (1L << 21)
#endif
/* conv's register-blocked kernels (direct forward, dw), multiply-adds
 * (about 0.1 ms of one core). */
#define PAR_MIN_CONV_BLOCKED (1L << 22)
/* conv dx as strided forward convolutions, N*Cin*H*W*Cout. */
#define PAR_MIN_CONV_DX (1L << 20)
/* Winograd tiles, N*tiles*Cout*Cin (each a 4x4 transform and 16 products). */
#define PAR_MIN_WINOGRAD (1L << 18)

#endif
