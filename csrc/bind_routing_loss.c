/* Binding of the routing_loss kernels (see csrc/binding.h for the conventions).
 * Forwards return the loss as a Python float; backwards accumulate into dlogits. */
#include "binding.h"
#include "routing_loss.h"

/* An optional array argument: None -> NULL, else as damex_buffer. */
static int opt_buffer(PyObject *obj, const char *name, int typenum, npy_intp n, const void **out)
{
    if (obj == Py_None) {
        *out = NULL;
        return 0;
    }
    *out = damex_buffer(obj, name, typenum, n, 0);
    return *out ? 0 : -1;
}

#define OPT_F32_IN(var, obj, n) \
    const float *var; \
    if (opt_buffer(obj, #var, NPY_FLOAT32, (n), (const void **)&var)) return NULL
#define OPT_U8_IN(var, obj, n) \
    const uint8_t *var; \
    if (opt_buffer(obj, #var, NPY_UINT8, (n), (const void **)&var)) return NULL

/* Run a forward kernel (which writes `loss_`) without the GIL; return the loss. */
#define DAMEX_RUN_LOSS(kernel_name, call) \
    do { \
        int status_; \
        double loss_ = 0.0; \
        Py_BEGIN_ALLOW_THREADS status_ = (call); Py_END_ALLOW_THREADS \
        if (status_ != DAMEX_OK) return damex_raise(status_, kernel_name); \
        return PyFloat_FromDouble(loss_); \
    } while (0)

/* importance_loss_forward(logits, noise|None, mask|None, T, E, variance) -> float */
static PyObject *py_importance_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *ologits, *onoise, *omask;
    Py_ssize_t t_, e_;
    int variance;
    if (!PyArg_ParseTuple(args, "OOOnni", &ologits, &onoise, &omask, &t_, &e_, &variance))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_IN(logits, ologits, (npy_intp)T * E);
    OPT_F32_IN(noise, onoise, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN_LOSS("importance_loss_forward",
                   importance_loss_forward(&loss_, logits, noise, mask, T, E, variance));
}

/* importance_loss_backward(dlogits, dloss, logits, noise|None, mask|None, T, E, variance) */
static PyObject *py_importance_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *odlogits, *ologits, *onoise, *omask;
    double dloss;
    Py_ssize_t t_, e_;
    int variance;
    if (!PyArg_ParseTuple(args, "OdOOOnni", &odlogits, &dloss, &ologits, &onoise, &omask, &t_,
                          &e_, &variance))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_OUT(dlogits, odlogits, (npy_intp)T * E);
    F32_IN(logits, ologits, (npy_intp)T * E);
    OPT_F32_IN(noise, onoise, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN("importance_loss_backward",
              importance_loss_backward(dlogits, dloss, logits, noise, mask, T, E, variance));
}

/* load_loss_forward(logits, noise, mask|None, T, E, k, sigma, variance) -> float */
static PyObject *py_load_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *ologits, *onoise, *omask;
    Py_ssize_t t_, e_;
    int k, variance;
    double sigma;
    if (!PyArg_ParseTuple(args, "OOOnnidi", &ologits, &onoise, &omask, &t_, &e_, &k, &sigma,
                          &variance))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_IN(logits, ologits, (npy_intp)T * E);
    F32_IN(noise, onoise, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN_LOSS("load_loss_forward",
                   load_loss_forward(&loss_, logits, noise, mask, T, E, k, sigma, variance));
}

/* load_loss_backward(dlogits, dloss, logits, noise, mask|None, T, E, k, sigma, variance) */
static PyObject *py_load_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *odlogits, *ologits, *onoise, *omask;
    double dloss, sigma;
    Py_ssize_t t_, e_;
    int k, variance;
    if (!PyArg_ParseTuple(args, "OdOOOnnidi", &odlogits, &dloss, &ologits, &onoise, &omask, &t_,
                          &e_, &k, &sigma, &variance))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_OUT(dlogits, odlogits, (npy_intp)T * E);
    F32_IN(logits, ologits, (npy_intp)T * E);
    F32_IN(noise, onoise, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN("load_loss_backward", load_loss_backward(dlogits, dloss, logits, noise, mask, T, E,
                                                       k, sigma, variance));
}

/* switch_loss_forward(logits, mask|None, T, E, k, counts) -> float */
static PyObject *py_switch_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *ologits, *omask;
    Py_ssize_t t_, e_;
    int k, counts;
    if (!PyArg_ParseTuple(args, "OOnnii", &ologits, &omask, &t_, &e_, &k, &counts)) return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_IN(logits, ologits, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN_LOSS("switch_loss_forward",
                   switch_loss_forward(&loss_, logits, mask, T, E, k, counts));
}

/* switch_loss_backward(dlogits, dloss, logits, mask|None, T, E, k, counts) */
static PyObject *py_switch_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *odlogits, *ologits, *omask;
    double dloss;
    Py_ssize_t t_, e_;
    int k, counts;
    if (!PyArg_ParseTuple(args, "OdOOnnii", &odlogits, &dloss, &ologits, &omask, &t_, &e_, &k,
                          &counts))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_OUT(dlogits, odlogits, (npy_intp)T * E);
    F32_IN(logits, ologits, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN("switch_loss_backward",
              switch_loss_backward(dlogits, dloss, logits, mask, T, E, k, counts));
}

/* z_loss_forward(logits, mask|None, T, E) -> float */
static PyObject *py_z_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *ologits, *omask;
    Py_ssize_t t_, e_;
    if (!PyArg_ParseTuple(args, "OOnn", &ologits, &omask, &t_, &e_)) return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_IN(logits, ologits, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN_LOSS("z_loss_forward", z_loss_forward(&loss_, logits, mask, T, E));
}

/* z_loss_backward(dlogits, dloss, logits, mask|None, T, E) */
static PyObject *py_z_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *odlogits, *ologits, *omask;
    double dloss;
    Py_ssize_t t_, e_;
    if (!PyArg_ParseTuple(args, "OdOOnn", &odlogits, &dloss, &ologits, &omask, &t_, &e_))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_OUT(dlogits, odlogits, (npy_intp)T * E);
    F32_IN(logits, ologits, (npy_intp)T * E);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN("z_loss_backward", z_loss_backward(dlogits, dloss, logits, mask, T, E));
}

/* damex_loss_forward(logits, expert_target, mask|None, T, E) -> float */
static PyObject *py_damex_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *ologits, *otarget, *omask;
    Py_ssize_t t_, e_;
    if (!PyArg_ParseTuple(args, "OOOnn", &ologits, &otarget, &omask, &t_, &e_)) return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_IN(logits, ologits, (npy_intp)T * E);
    I64_IN(expert_target, otarget, T);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN_LOSS("damex_loss_forward",
                   damex_loss_forward(&loss_, logits, expert_target, mask, T, E));
}

/* damex_loss_backward(dlogits, dloss, logits, expert_target, mask|None, T, E) */
static PyObject *py_damex_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *odlogits, *ologits, *otarget, *omask;
    double dloss;
    Py_ssize_t t_, e_;
    if (!PyArg_ParseTuple(args, "OdOOOnn", &odlogits, &dloss, &ologits, &otarget, &omask, &t_,
                          &e_))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    F32_OUT(dlogits, odlogits, (npy_intp)T * E);
    F32_IN(logits, ologits, (npy_intp)T * E);
    I64_IN(expert_target, otarget, T);
    OPT_U8_IN(mask, omask, T);
    DAMEX_RUN("damex_loss_backward",
              damex_loss_backward(dlogits, dloss, logits, expert_target, mask, T, E));
}

PyMethodDef damex_routing_loss_methods[] = {
    {"importance_loss_forward", py_importance_loss_forward, METH_VARARGS, NULL},
    {"importance_loss_backward", py_importance_loss_backward, METH_VARARGS, NULL},
    {"load_loss_forward", py_load_loss_forward, METH_VARARGS, NULL},
    {"load_loss_backward", py_load_loss_backward, METH_VARARGS, NULL},
    {"switch_loss_forward", py_switch_loss_forward, METH_VARARGS, NULL},
    {"switch_loss_backward", py_switch_loss_backward, METH_VARARGS, NULL},
    {"z_loss_forward", py_z_loss_forward, METH_VARARGS, NULL},
    {"z_loss_backward", py_z_loss_backward, METH_VARARGS, NULL},
    {"damex_loss_forward", py_damex_loss_forward, METH_VARARGS, NULL},
    {"damex_loss_backward", py_damex_loss_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
