/* Binding of the moe kernels (see csrc/binding.h for the conventions).
 * Argument order follows the kernels (csrc/kernels/moe.h). */
#include "binding.h"
#include "moe.h"

#define ROUTING_IN(T_, k_, E_) \
    I64_IN(expert_index, oei, (npy_intp)(T_) * (k_)); \
    I64_IN(slot, osl, (npy_intp)(T_) * (k_)); \
    I64_IN(expert_count, oec, (E_))

/* dispatch_forward(xe, x, expert_index, slot, expert_count, T, k, D, E, N) */
static PyObject *py_dispatch_forward(PyObject *self, PyObject *args)
{
    PyObject *oxe, *ox, *oei, *osl, *oec;
    Py_ssize_t t_, k_, d_, e_, n_;
    if (!PyArg_ParseTuple(args, "OOOOOnnnnn", &oxe, &ox, &oei, &osl, &oec, &t_, &k_, &d_, &e_, &n_))
        return NULL;
    DIM(T, t_);
    DIM(k, k_);
    DIM(D, d_);
    DIM(E, e_);
    DIM(N, n_);
    F32_OUT(xe, oxe, (npy_intp)N * D);
    F32_IN(x, ox, (npy_intp)T * D);
    ROUTING_IN(T, k, E);
    DAMEX_RUN("dispatch_forward",
              dispatch_forward(xe, x, expert_index, slot, expert_count, T, k, D, E, N));
}

/* dispatch_backward(dx, dxe, expert_index, slot, expert_count, T, k, D, E, N) */
static PyObject *py_dispatch_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odxe, *oei, *osl, *oec;
    Py_ssize_t t_, k_, d_, e_, n_;
    if (!PyArg_ParseTuple(args, "OOOOOnnnnn", &odx, &odxe, &oei, &osl, &oec, &t_, &k_, &d_, &e_,
                          &n_))
        return NULL;
    DIM(T, t_);
    DIM(k, k_);
    DIM(D, d_);
    DIM(E, e_);
    DIM(N, n_);
    F32_OUT(dx, odx, (npy_intp)T * D);
    F32_IN(dxe, odxe, (npy_intp)N * D);
    ROUTING_IN(T, k, E);
    DAMEX_RUN("dispatch_backward",
              dispatch_backward(dx, dxe, expert_index, slot, expert_count, T, k, D, E, N));
}

/* combine_forward(y, ye, combine_weight, expert_index, slot, expert_count, T, k, D, E, N) */
static PyObject *py_combine_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *oye, *ow, *oei, *osl, *oec;
    Py_ssize_t t_, k_, d_, e_, n_;
    if (!PyArg_ParseTuple(args, "OOOOOOnnnnn", &oy, &oye, &ow, &oei, &osl, &oec, &t_, &k_, &d_,
                          &e_, &n_))
        return NULL;
    DIM(T, t_);
    DIM(k, k_);
    DIM(D, d_);
    DIM(E, e_);
    DIM(N, n_);
    F32_OUT(y, oy, (npy_intp)T * D);
    F32_IN(ye, oye, (npy_intp)N * D);
    F32_IN(combine_weight, ow, (npy_intp)T * k);
    ROUTING_IN(T, k, E);
    DAMEX_RUN("combine_forward", combine_forward(y, ye, combine_weight, expert_index, slot,
                                                 expert_count, T, k, D, E, N));
}

/* combine_backward(dye, dcombine_weight, dy, ye, combine_weight, expert_index, slot,
 *                  expert_count, T, k, D, E, N) */
static PyObject *py_combine_backward(PyObject *self, PyObject *args)
{
    PyObject *odye, *odw, *ody, *oye, *ow, *oei, *osl, *oec;
    Py_ssize_t t_, k_, d_, e_, n_;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnnnnn", &odye, &odw, &ody, &oye, &ow, &oei, &osl, &oec,
                          &t_, &k_, &d_, &e_, &n_))
        return NULL;
    DIM(T, t_);
    DIM(k, k_);
    DIM(D, d_);
    DIM(E, e_);
    DIM(N, n_);
    F32_OUT(dye, odye, (npy_intp)N * D);
    F32_OUT(dcombine_weight, odw, (npy_intp)T * k);
    F32_IN(dy, ody, (npy_intp)T * D);
    F32_IN(ye, oye, (npy_intp)N * D);
    F32_IN(combine_weight, ow, (npy_intp)T * k);
    ROUTING_IN(T, k, E);
    DAMEX_RUN("combine_backward", combine_backward(dye, dcombine_weight, dy, ye, combine_weight,
                                                   expert_index, slot, expert_count, T, k, D, E,
                                                   N));
}

/* expert_ffn_forward(ye, h, a, xe, w1, b1, w2, b2, expert_count, E, D, F, N, act) */
static PyObject *py_expert_ffn_forward(PyObject *self, PyObject *args)
{
    PyObject *oye, *oh, *oa, *oxe, *ow1, *ob1, *ow2, *ob2, *oec;
    Py_ssize_t e_, d_, f_, n_;
    int act;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOnnnni", &oye, &oh, &oa, &oxe, &ow1, &ob1, &ow2, &ob2,
                          &oec, &e_, &d_, &f_, &n_, &act))
        return NULL;
    DIM(E, e_);
    DIM(D, d_);
    DIM(F, f_);
    DIM(N, n_);
    F32_OUT(ye, oye, (npy_intp)N * D);
    F32_OUT(h, oh, (npy_intp)N * F);
    F32_OUT(a, oa, (npy_intp)N * F);
    F32_IN(xe, oxe, (npy_intp)N * D);
    F32_IN(w1, ow1, (npy_intp)E * D * F);
    F32_IN(b1, ob1, (npy_intp)E * F);
    F32_IN(w2, ow2, (npy_intp)E * F * D);
    F32_IN(b2, ob2, (npy_intp)E * D);
    I64_IN(expert_count, oec, E);
    DAMEX_RUN("expert_ffn_forward", expert_ffn_forward(ye, h, a, xe, w1, b1, w2, b2, expert_count,
                                                       E, D, F, N, act));
}

/* expert_ffn_backward(dxe, dw1, db1, dw2, db2, dh, dye, xe, h, a, w1, w2, expert_count,
 *                     E, D, F, N, act); dh[N,F] is scratch */
static PyObject *py_expert_ffn_backward(PyObject *self, PyObject *args)
{
    PyObject *odxe, *odw1, *odb1, *odw2, *odb2, *odh, *odye, *oxe, *oh, *oa, *ow1, *ow2, *oec;
    Py_ssize_t e_, d_, f_, n_;
    int act;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOnnnni", &odxe, &odw1, &odb1, &odw2, &odb2, &odh,
                          &odye, &oxe, &oh, &oa, &ow1, &ow2, &oec, &e_, &d_, &f_, &n_, &act))
        return NULL;
    DIM(E, e_);
    DIM(D, d_);
    DIM(F, f_);
    DIM(N, n_);
    F32_OUT(dxe, odxe, (npy_intp)N * D);
    F32_OUT(dw1, odw1, (npy_intp)E * D * F);
    F32_OUT(db1, odb1, (npy_intp)E * F);
    F32_OUT(dw2, odw2, (npy_intp)E * F * D);
    F32_OUT(db2, odb2, (npy_intp)E * D);
    F32_OUT(dh, odh, (npy_intp)N * F);
    F32_IN(dye, odye, (npy_intp)N * D);
    F32_IN(xe, oxe, (npy_intp)N * D);
    F32_IN(h, oh, (npy_intp)N * F);
    F32_IN(a, oa, (npy_intp)N * F);
    F32_IN(w1, ow1, (npy_intp)E * D * F);
    F32_IN(w2, ow2, (npy_intp)E * F * D);
    I64_IN(expert_count, oec, E);
    DAMEX_RUN("expert_ffn_backward", expert_ffn_backward(dxe, dw1, db1, dw2, db2, dh, dye, xe, h, a,
                                                         w1, w2, expert_count, E, D, F, N, act));
}

PyMethodDef damex_moe_methods[] = {
    {"dispatch_forward", py_dispatch_forward, METH_VARARGS, NULL},
    {"dispatch_backward", py_dispatch_backward, METH_VARARGS, NULL},
    {"combine_forward", py_combine_forward, METH_VARARGS, NULL},
    {"combine_backward", py_combine_backward, METH_VARARGS, NULL},
    {"expert_ffn_forward", py_expert_ffn_forward, METH_VARARGS, NULL},
    {"expert_ffn_backward", py_expert_ffn_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
