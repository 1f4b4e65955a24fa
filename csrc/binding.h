/* The helpers of the CPython/NumPy binding.
 *
 * Every kernel is described once in csrc/kernels.spec; csrc/bindgen.py expands
 * the spec into its entry points (build/generated/bind_kernels.c), which call
 * the helpers below.  The few hand-written entry points (csrc/module.c,
 * csrc/bind_conv.c) use the same helpers.
 *
 * The Python layer (damex/ops) validates and converts every argument and
 * allocates the outputs; a binding function only checks that each buffer is
 * what the kernel will read or write (dtype, C-contiguity, element count,
 * writeability) and each size is in range, so that a direct call into damex._C
 * can never crash, then releases the GIL, calls the kernel with the thread
 * count of damex.set_num_threads, and maps its status to an exception. */
#ifndef DAMEX_BINDING_H
#define DAMEX_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL damex_ARRAY_API
#ifndef DAMEX_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#include <stdint.h>

#include "status.h"
#include "threads.h"

/* Flags of a buffer argument. */
#define DAMEX_IN 0        /* read only */
#define DAMEX_OUT 1       /* written: must be writeable */
#define DAMEX_OPTIONAL 2  /* None is accepted and gives NULL */

/* Data pointer of `obj`, which must be an ndarray of `typenum`, C-contiguous,
 * aligned, holding exactly `n` elements (n < 0: any count) and writeable if
 * flags has DAMEX_OUT; NULL for None if flags has DAMEX_OPTIONAL.  On failure
 * sets TypeError/ValueError naming `kernel` and `name` and returns NULL. */
void *damex_buffer(PyObject *obj, const char *kernel, const char *name, int typenum, npy_intp n,
                   int flags);

/* `type *var` = the checked buffer `obj` (see damex_buffer), or return NULL. */
#define DAMEX_BUFFER(type, var, obj, kernel, typenum, n, flags) \
    type *var = (type *)damex_buffer((obj), (kernel), #var, (typenum), (n), (flags)); \
    if (!var && !(((flags) & DAMEX_OPTIONAL) && (obj) == Py_None)) return NULL

/* *count = elements of the (checked) ndarray `obj` / `per`, which must divide
 * them; returns -1 with ValueError set. */
int damex_count(npy_intp *count, PyObject *obj, npy_intp per, const char *kernel,
                const char *name);

/* *out = v, a size argument that must lie in [lo, hi]; returns -1 with ValueError set. */
int damex_dim(int *out, Py_ssize_t v, long lo, long hi, const char *kernel, const char *name);

/* a * b for element counts; NPY_MAX_INTP (which no buffer holds) on overflow. */
static inline npy_intp damex_mul(npy_intp a, npy_intp b)
{
    npy_intp r;
    return __builtin_mul_overflow(a, b, &r) ? NPY_MAX_INTP : r;
}

/* Turns a kernel status into a Python exception; returns NULL. */
PyObject *damex_raise(int status, const char *kernel);

/* Sets ValueError "kernel: message"; returns NULL. */
PyObject *damex_invalid(const char *kernel, const char *message);

/* Run a kernel without the GIL, with damex's thread count, into `status_`. */
#define DAMEX_CALL(call) \
    int status_; \
    Py_BEGIN_ALLOW_THREADS damex_threads_enter(); status_ = (call); Py_END_ALLOW_THREADS

/* Run a kernel and return None or raise. */
#define DAMEX_RUN(kernel_name, call) \
    do { \
        DAMEX_CALL(call); \
        if (status_ != DAMEX_OK) return damex_raise(status_, kernel_name); \
        Py_RETURN_NONE; \
    } while (0)

/* Run a kernel that writes the double `var`; return it as a float or raise. */
#define DAMEX_RUN_FLOAT(kernel_name, call, var) \
    do { \
        DAMEX_CALL(call); \
        if (status_ != DAMEX_OK) return damex_raise(status_, kernel_name); \
        return PyFloat_FromDouble(var); \
    } while (0)

/* Run a kernel; return 0, or 1 where it met NaN/inf (the caller names the culprit). */
#define DAMEX_RUN_NONFINITE(kernel_name, call) \
    do { \
        DAMEX_CALL(call); \
        if (status_ == DAMEX_ENONFINITE) return PyLong_FromLong(1); \
        if (status_ != DAMEX_OK) return damex_raise(status_, kernel_name); \
        return PyLong_FromLong(0); \
    } while (0)

/* The method tables: the generated one (csrc/kernels.spec) and the hand-written conv2d. */
extern PyMethodDef damex_kernel_methods[];
extern PyMethodDef damex_conv_methods[];

#endif
