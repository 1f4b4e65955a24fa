/* Binding of the masked multi-head attention kernels (csrc/kernels/attention.c). */
#include "binding.h"
#include "attention.h"

static const uint8_t *optional_mask(PyObject *obj, const char *name, npy_intp n)
{
    if (obj == Py_None) return NULL;
    return (const uint8_t *)damex_buffer(obj, name, NPY_UINT8, n, 0);
}

/* attention_forward(out, attn, q, k, v, attn_mask|None, key_padding_mask|None, N, Lq, Lk, C, H) */
static PyObject *py_attention_forward(PyObject *self, PyObject *args)
{
    PyObject *oo, *oa, *oq, *ok, *ov, *om, *okp;
    Py_ssize_t n_, lq_, lk_, c_, h_;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnnnn", &oo, &oa, &oq, &ok, &ov, &om, &okp, &n_, &lq_,
                          &lk_, &c_, &h_))
        return NULL;
    DIM(N, n_);
    DIM(Lq, lq_);
    DIM(Lk, lk_);
    DIM(C, c_);
    DIM(H, h_);
    if (H < 1 || C % H) {
        PyErr_SetString(PyExc_ValueError, "attention_forward: num_heads must divide C");
        return NULL;
    }
    F32_OUT(out, oo, (npy_intp)N * Lq * C);
    F32_OUT(attn, oa, (npy_intp)N * H * Lq * Lk);
    F32_IN(q, oq, (npy_intp)N * Lq * C);
    F32_IN(k, ok, (npy_intp)N * Lk * C);
    F32_IN(v, ov, (npy_intp)N * Lk * C);
    const uint8_t *attn_mask = optional_mask(om, "attn_mask", (npy_intp)Lq * Lk);
    if (om != Py_None && !attn_mask) return NULL;
    const uint8_t *kpm = optional_mask(okp, "key_padding_mask", (npy_intp)N * Lk);
    if (okp != Py_None && !kpm) return NULL;
    DAMEX_RUN("attention_forward",
              attention_forward(out, attn, q, k, v, attn_mask, kpm, N, Lq, Lk, C, H));
}

/* attention_backward(dq, dk, dv, dout, attn, q, k, v, N, Lq, Lk, C, H) */
static PyObject *py_attention_backward(PyObject *self, PyObject *args)
{
    PyObject *odq, *odk, *odv, *odo, *oa, *oq, *ok, *ov;
    Py_ssize_t n_, lq_, lk_, c_, h_;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnnnnn", &odq, &odk, &odv, &odo, &oa, &oq, &ok, &ov, &n_,
                          &lq_, &lk_, &c_, &h_))
        return NULL;
    DIM(N, n_);
    DIM(Lq, lq_);
    DIM(Lk, lk_);
    DIM(C, c_);
    DIM(H, h_);
    if (H < 1 || C % H) {
        PyErr_SetString(PyExc_ValueError, "attention_backward: num_heads must divide C");
        return NULL;
    }
    F32_OUT(dq, odq, (npy_intp)N * Lq * C);
    F32_OUT(dk, odk, (npy_intp)N * Lk * C);
    F32_OUT(dv, odv, (npy_intp)N * Lk * C);
    F32_IN(dout, odo, (npy_intp)N * Lq * C);
    F32_IN(attn, oa, (npy_intp)N * H * Lq * Lk);
    F32_IN(q, oq, (npy_intp)N * Lq * C);
    F32_IN(k, ok, (npy_intp)N * Lk * C);
    F32_IN(v, ov, (npy_intp)N * Lk * C);
    DAMEX_RUN("attention_backward",
              attention_backward(dq, dk, dv, dout, attn, q, k, v, N, Lq, Lk, C, H));
}

PyMethodDef damex_attention_methods[] = {
    {"attention_forward", py_attention_forward, METH_VARARGS, NULL},
    {"attention_backward", py_attention_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
