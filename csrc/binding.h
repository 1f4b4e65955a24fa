/* Shared helpers of the CPython/NumPy binding (csrc/module.c and csrc/bind_*.c).
 *
 * The Python layer (damex/ops) validates and converts every argument and
 * allocates the outputs; a binding function only checks that each buffer is
 * what the kernel will read or write (dtype, C-contiguity, element count,
 * writeability) so that a direct call into damex._C can never crash, then
 * releases the GIL, calls the kernel and maps its status to an exception. */
#ifndef DAMEX_BINDING_H
#define DAMEX_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL damex_ARRAY_API
#ifndef DAMEX_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "status.h"

/* Data pointer of `obj`, which must be an ndarray of `typenum`, C-contiguous,
 * aligned, holding exactly `n` elements (n < 0: any count) and writeable if
 * `writeable`.  On failure sets TypeError/ValueError naming `name`, returns NULL. */
void *damex_buffer(PyObject *obj, const char *name, int typenum, npy_intp n, int writeable);

/* Number of elements of an ndarray (call after damex_buffer succeeded). */
npy_intp damex_size(PyObject *obj);

/* Turns a kernel status into a Python exception; returns NULL. */
PyObject *damex_raise(int status, const char *kernel);

/* A size argument that must fit in an int and be >= 0; returns -1 with ValueError set. */
int damex_dim(Py_ssize_t v, const char *name);

#define F32_IN(var, obj, n) \
    const float *var = (const float *)damex_buffer(obj, #var, NPY_FLOAT32, (n), 0); \
    if (!var) return NULL
#define F32_OUT(var, obj, n) \
    float *var = (float *)damex_buffer(obj, #var, NPY_FLOAT32, (n), 1); \
    if (!var) return NULL
#define I64_IN(var, obj, n) \
    const int64_t *var = (const int64_t *)damex_buffer(obj, #var, NPY_INT64, (n), 0); \
    if (!var) return NULL
#define I64_OUT(var, obj, n) \
    int64_t *var = (int64_t *)damex_buffer(obj, #var, NPY_INT64, (n), 1); \
    if (!var) return NULL
#define U8_IN(var, obj, n) \
    const uint8_t *var = (const uint8_t *)damex_buffer(obj, #var, NPY_UINT8, (n), 0); \
    if (!var) return NULL
#define DIM(var, v) \
    int var = damex_dim((v), #var); \
    if (var < 0) return NULL

/* Run a kernel without the GIL and return None or raise. */
#define DAMEX_RUN(kernel_name, call) \
    do { \
        int status_; \
        Py_BEGIN_ALLOW_THREADS status_ = (call); Py_END_ALLOW_THREADS \
        if (status_ != DAMEX_OK) return damex_raise(status_, kernel_name); \
        Py_RETURN_NONE; \
    } while (0)

/* Method tables of the kernel families, one per csrc/bind_*.c. */
extern PyMethodDef damex_activation_methods[];
extern PyMethodDef damex_router_methods[];
extern PyMethodDef damex_moe_methods[];
extern PyMethodDef damex_routing_loss_methods[];
extern PyMethodDef damex_nn_methods[];
extern PyMethodDef damex_attention_methods[];
extern PyMethodDef damex_msda_methods[];
extern PyMethodDef damex_box_methods[];
extern PyMethodDef damex_optim_methods[];

#endif
