/* Binding of the multi-scale deformable attention kernels (csrc/kernels/msda.c);
 * see csrc/binding.h for the conventions.  damex/ops/msda.py validates with
 * messages that name the arguments; these checks only keep direct calls safe. */
#include "binding.h"
#include "msda.h"

#define MSDA_SIZES                                                                    \
    DIM(N, n_);                                                                       \
    DIM(S, s_);                                                                       \
    DIM(M, m_);                                                                       \
    DIM(D, d_);                                                                       \
    DIM(Lq, lq_);                                                                     \
    DIM(L, l_);                                                                       \
    DIM(P, p_);                                                                       \
    npy_intp n_value = (npy_intp)N * S * M * D, n_out = (npy_intp)N * Lq * M * D;     \
    npy_intp n_attw = (npy_intp)N * Lq * M * L * P

/* ms_deform_attn_forward(out, value, spatial_shapes, level_start, loc, attw, N, S, M, D, Lq, L, P) */
static PyObject *py_ms_deform_attn_forward(PyObject *self, PyObject *args)
{
    PyObject *oout, *ovalue, *oshapes, *ostart, *oloc, *oattw;
    Py_ssize_t n_, s_, m_, d_, lq_, l_, p_;
    if (!PyArg_ParseTuple(args, "OOOOOOnnnnnnn", &oout, &ovalue, &oshapes, &ostart, &oloc, &oattw,
                          &n_, &s_, &m_, &d_, &lq_, &l_, &p_))
        return NULL;
    MSDA_SIZES;
    F32_IN(value, ovalue, n_value);
    I64_IN(spatial_shapes, oshapes, (npy_intp)L * 2);
    I64_IN(level_start_index, ostart, L);
    F32_IN(sampling_locations, oloc, n_attw * 2);
    F32_IN(attention_weights, oattw, n_attw);
    F32_OUT(out, oout, n_out);
    DAMEX_RUN("ms_deform_attn_forward",
              ms_deform_attn_forward(out, value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights, N, S, M, D, Lq, L, P));
}

/* ms_deform_attn_backward(grad_value, grad_loc, grad_attw, grad_output, value, spatial_shapes,
 *                         level_start, loc, attw, N, S, M, D, Lq, L, P): accumulates */
static PyObject *py_ms_deform_attn_backward(PyObject *self, PyObject *args)
{
    PyObject *ogv, *ogl, *oga, *ogo, *ovalue, *oshapes, *ostart, *oloc, *oattw;
    Py_ssize_t n_, s_, m_, d_, lq_, l_, p_;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOnnnnnnn", &ogv, &ogl, &oga, &ogo, &ovalue, &oshapes,
                          &ostart, &oloc, &oattw, &n_, &s_, &m_, &d_, &lq_, &l_, &p_))
        return NULL;
    MSDA_SIZES;
    F32_IN(grad_output, ogo, n_out);
    F32_IN(value, ovalue, n_value);
    I64_IN(spatial_shapes, oshapes, (npy_intp)L * 2);
    I64_IN(level_start_index, ostart, L);
    F32_IN(sampling_locations, oloc, n_attw * 2);
    F32_IN(attention_weights, oattw, n_attw);
    F32_OUT(grad_value, ogv, n_value);
    F32_OUT(grad_sampling_locations, ogl, n_attw * 2);
    F32_OUT(grad_attention_weights, oga, n_attw);
    DAMEX_RUN("ms_deform_attn_backward",
              ms_deform_attn_backward(grad_value, grad_sampling_locations, grad_attention_weights,
                                      grad_output, value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, N, S, M, D, Lq, L,
                                      P));
}

PyMethodDef damex_msda_methods[] = {
    {"ms_deform_attn_forward", py_ms_deform_attn_forward, METH_VARARGS, NULL},
    {"ms_deform_attn_backward", py_ms_deform_attn_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
