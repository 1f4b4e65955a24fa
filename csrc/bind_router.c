/* Binding of the router kernels (csrc/kernels/router.c; see csrc/binding.h for
 * the conventions).  damex/ops/router.py validates, allocates and calls these. */
#include "binding.h"
#include "router.h"

/* router_forward(logits, noisy_logits, probs, expert_index, combine_weight, slot,
 *                expert_count, offset, x, noise|None, mask|None, w_router,
 *                T, D, E, k, capacity, bpr, normalize) -> 0, or 1 when a router
 * logit is NaN/inf (the Python layer then names the culprit). */
static PyObject *py_router_forward(PyObject *self, PyObject *args)
{
    PyObject *ol, *on, *op, *oi, *ow, *os, *oc, *oo, *ox, *onz, *om, *owr;
    Py_ssize_t t_, d_, e_, k_, capacity;
    int bpr, normalize;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOnnnnnii", &ol, &on, &op, &oi, &ow, &os, &oc, &oo,
                          &ox, &onz, &om, &owr, &t_, &d_, &e_, &k_, &capacity, &bpr, &normalize))
        return NULL;
    DIM(T, t_);
    DIM(D, d_);
    DIM(E, e_);
    DIM(k, k_);
    if (E < 1 || k < 1 || k > E) {
        PyErr_Format(PyExc_ValueError, "router_forward: k must be in [1, E=%d], got %d", E, k);
        return NULL;
    }
    if (capacity < -1 || capacity > 2147483647) {
        PyErr_Format(PyExc_ValueError, "router_forward: capacity %zd out of range", capacity);
        return NULL;
    }
    npy_intp te = (npy_intp)T * E, tk = (npy_intp)T * k;
    F32_OUT(logits, ol, te);
    F32_OUT(noisy_logits, on, te);
    F32_OUT(probs, op, te);
    I64_OUT(expert_index, oi, tk);
    F32_OUT(combine_weight, ow, tk);
    I64_OUT(slot, os, tk);
    I64_OUT(expert_count, oc, E);
    I64_OUT(offset, oo, E);
    F32_IN(x, ox, (npy_intp)T * D);
    F32_IN(w_router, owr, (npy_intp)D * E);
    const float *noise = NULL;
    if (onz != Py_None) {
        noise = (const float *)damex_buffer(onz, "noise", NPY_FLOAT32, te, 0);
        if (!noise) return NULL;
    }
    const uint8_t *mask = NULL;
    if (om != Py_None) {
        mask = (const uint8_t *)damex_buffer(om, "mask", NPY_UINT8, T, 0);
        if (!mask) return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = router_forward(logits, noisy_logits, probs, expert_index, combine_weight, slot,
                            expert_count, offset, x, noise, mask, w_router, T, D, E, k,
                            (long)capacity, bpr != 0, normalize);
    Py_END_ALLOW_THREADS
    if (status == DAMEX_ENONFINITE) return PyLong_FromLong(1);
    if (status != DAMEX_OK) return damex_raise(status, "router_forward");
    return PyLong_FromLong(0);
}

/* router_backward(dlogits, dcombine_weight, probs, expert_index, slot, T, E, k, normalize):
 * dlogits += gradient of combine_weight w.r.t. the logits, applied to dcombine_weight. */
static PyObject *py_router_backward(PyObject *self, PyObject *args)
{
    PyObject *odl, *odw, *op, *oi, *os;
    Py_ssize_t t_, e_, k_;
    int normalize;
    if (!PyArg_ParseTuple(args, "OOOOOnnni", &odl, &odw, &op, &oi, &os, &t_, &e_, &k_,
                          &normalize))
        return NULL;
    DIM(T, t_);
    DIM(E, e_);
    DIM(k, k_);
    npy_intp te = (npy_intp)T * E, tk = (npy_intp)T * k;
    F32_OUT(dlogits, odl, te);
    F32_IN(dcombine_weight, odw, tk);
    F32_IN(probs, op, te);
    I64_IN(expert_index, oi, tk);
    I64_IN(slot, os, tk);
    DAMEX_RUN("router_backward", router_backward(dlogits, dcombine_weight, probs, expert_index,
                                                 slot, T, E, k, normalize));
}

/* router_logits_backward(dx, dw_router, dlogits, x, w_router, T, D, E):
 * dx += dlogits @ w_router^T, dw_router += x^T @ dlogits. */
static PyObject *py_router_logits_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odw, *odl, *ox, *ow;
    Py_ssize_t t_, d_, e_;
    if (!PyArg_ParseTuple(args, "OOOOOnnn", &odx, &odw, &odl, &ox, &ow, &t_, &d_, &e_))
        return NULL;
    DIM(T, t_);
    DIM(D, d_);
    DIM(E, e_);
    F32_OUT(dx, odx, (npy_intp)T * D);
    F32_OUT(dw_router, odw, (npy_intp)D * E);
    F32_IN(dlogits, odl, (npy_intp)T * E);
    F32_IN(x, ox, (npy_intp)T * D);
    F32_IN(w_router, ow, (npy_intp)D * E);
    DAMEX_RUN("router_logits_backward",
              router_logits_backward(dx, dw_router, dlogits, x, w_router, T, D, E));
}

PyMethodDef damex_router_methods[] = {
    {"router_forward", py_router_forward, METH_VARARGS, NULL},
    {"router_backward", py_router_backward, METH_VARARGS, NULL},
    {"router_logits_backward", py_router_logits_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
