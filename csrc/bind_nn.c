/* Binding of the nn kernels (see csrc/binding.h for the conventions):
 * linear.c, norm.c, conv.c, elementwise.c, softmax.c, embedding.c. */
#include "binding.h"
#include "conv.h"
#include "elementwise.h"
#include "embedding.h"
#include "linear.h"
#include "norm.h"
#include "softmax.h"

/* An optional float32 buffer: None gives NULL. */
#define F32_OPT_IN(var, obj, n) \
    const float *var = NULL; \
    if ((obj) != Py_None) { \
        var = (const float *)damex_buffer(obj, #var, NPY_FLOAT32, (n), 0); \
        if (!var) return NULL; \
    }
#define F32_OPT_OUT(var, obj, n) \
    float *var = NULL; \
    if ((obj) != Py_None) { \
        var = (float *)damex_buffer(obj, #var, NPY_FLOAT32, (n), 1); \
        if (!var) return NULL; \
    }
#define U8_OUT(var, obj, n) \
    uint8_t *var = (uint8_t *)damex_buffer(obj, #var, NPY_UINT8, (n), 1); \
    if (!var) return NULL

/* linear_forward(y, x, w, b|None, N, Din, Dout) */
static PyObject *py_linear_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox, *ow, *ob;
    Py_ssize_t n_, i_, o_;
    if (!PyArg_ParseTuple(args, "OOOOnnn", &oy, &ox, &ow, &ob, &n_, &i_, &o_)) return NULL;
    DIM(N, n_);
    DIM(Din, i_);
    DIM(Dout, o_);
    F32_OUT(y, oy, (npy_intp)N * Dout);
    F32_IN(x, ox, (npy_intp)N * Din);
    F32_IN(w, ow, (npy_intp)Dout * Din);
    F32_OPT_IN(b, ob, Dout);
    DAMEX_RUN("linear_forward", linear_forward(y, x, w, b, N, Din, Dout));
}

/* linear_backward(dx|None, dw|None, db|None, dy, x, w, N, Din, Dout) */
static PyObject *py_linear_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odw, *odb, *ody, *ox, *ow;
    Py_ssize_t n_, i_, o_;
    if (!PyArg_ParseTuple(args, "OOOOOOnnn", &odx, &odw, &odb, &ody, &ox, &ow, &n_, &i_, &o_))
        return NULL;
    DIM(N, n_);
    DIM(Din, i_);
    DIM(Dout, o_);
    F32_OPT_OUT(dx, odx, (npy_intp)N * Din);
    F32_OPT_OUT(dw, odw, (npy_intp)Dout * Din);
    F32_OPT_OUT(db, odb, Dout);
    F32_IN(dy, ody, (npy_intp)N * Dout);
    F32_IN(x, ox, (npy_intp)N * Din);
    F32_IN(w, ow, (npy_intp)Dout * Din);
    DAMEX_RUN("linear_backward", linear_backward(dx, dw, db, dy, x, w, N, Din, Dout));
}

/* layer_norm_forward(y, mean, rstd, x, gamma, beta, N, C, eps) */
static PyObject *py_layer_norm_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *om, *or, *ox, *og, *ob;
    Py_ssize_t n_, c_;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOOOOnnf", &oy, &om, &or, &ox, &og, &ob, &n_, &c_, &eps))
        return NULL;
    DIM(N, n_);
    DIM(C, c_);
    F32_OUT(y, oy, (npy_intp)N * C);
    F32_OUT(mean, om, N);
    F32_OUT(rstd, or, N);
    F32_IN(x, ox, (npy_intp)N * C);
    F32_IN(gamma, og, C);
    F32_IN(beta, ob, C);
    DAMEX_RUN("layer_norm_forward", layer_norm_forward(y, mean, rstd, x, gamma, beta, N, C, eps));
}

/* layer_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, N, C) */
static PyObject *py_layer_norm_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odg, *odb, *ody, *ox, *om, *or, *og;
    Py_ssize_t n_, c_;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnn", &odx, &odg, &odb, &ody, &ox, &om, &or, &og, &n_,
                          &c_))
        return NULL;
    DIM(N, n_);
    DIM(C, c_);
    F32_OUT(dx, odx, (npy_intp)N * C);
    F32_OUT(dgamma, odg, C);
    F32_OUT(dbeta, odb, C);
    F32_IN(dy, ody, (npy_intp)N * C);
    F32_IN(x, ox, (npy_intp)N * C);
    F32_IN(mean, om, N);
    F32_IN(rstd, or, N);
    F32_IN(gamma, og, C);
    DAMEX_RUN("layer_norm_backward",
              layer_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, N, C));
}

/* group_norm_forward(y, mean, rstd, x, gamma, beta, N, C, HW, G, eps) */
static PyObject *py_group_norm_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *om, *or, *ox, *og, *ob;
    Py_ssize_t n_, c_, hw_, g_;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOOOOnnnnf", &oy, &om, &or, &ox, &og, &ob, &n_, &c_, &hw_, &g_,
                          &eps))
        return NULL;
    DIM(N, n_);
    DIM(C, c_);
    DIM(HW, hw_);
    DIM(G, g_);
    F32_OUT(y, oy, (npy_intp)N * C * HW);
    F32_OUT(mean, om, (npy_intp)N * G);
    F32_OUT(rstd, or, (npy_intp)N * G);
    F32_IN(x, ox, (npy_intp)N * C * HW);
    F32_IN(gamma, og, C);
    F32_IN(beta, ob, C);
    DAMEX_RUN("group_norm_forward",
              group_norm_forward(y, mean, rstd, x, gamma, beta, N, C, HW, G, eps));
}

/* group_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, N, C, HW, G) */
static PyObject *py_group_norm_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odg, *odb, *ody, *ox, *om, *or, *og;
    Py_ssize_t n_, c_, hw_, g_;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnnnn", &odx, &odg, &odb, &ody, &ox, &om, &or, &og, &n_,
                          &c_, &hw_, &g_))
        return NULL;
    DIM(N, n_);
    DIM(C, c_);
    DIM(HW, hw_);
    DIM(G, g_);
    F32_OUT(dx, odx, (npy_intp)N * C * HW);
    F32_OUT(dgamma, odg, C);
    F32_OUT(dbeta, odb, C);
    F32_IN(dy, ody, (npy_intp)N * C * HW);
    F32_IN(x, ox, (npy_intp)N * C * HW);
    F32_IN(mean, om, (npy_intp)N * G);
    F32_IN(rstd, or, (npy_intp)N * G);
    F32_IN(gamma, og, C);
    DAMEX_RUN("group_norm_backward",
              group_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, N, C, HW, G));
}

/* frozen_batch_norm_forward(y, x, weight, bias, running_mean, running_var, N, C, HW, eps) */
static PyObject *py_frozen_batch_norm_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox, *ow, *ob, *om, *ov;
    Py_ssize_t n_, c_, hw_;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOOOOnnnf", &oy, &ox, &ow, &ob, &om, &ov, &n_, &c_, &hw_, &eps))
        return NULL;
    DIM(N, n_);
    DIM(C, c_);
    DIM(HW, hw_);
    F32_OUT(y, oy, (npy_intp)N * C * HW);
    F32_IN(x, ox, (npy_intp)N * C * HW);
    F32_IN(weight, ow, C);
    F32_IN(bias, ob, C);
    F32_IN(running_mean, om, C);
    F32_IN(running_var, ov, C);
    DAMEX_RUN("frozen_batch_norm_forward",
              frozen_batch_norm_forward(y, x, weight, bias, running_mean, running_var, N, C, HW,
                                        eps));
}

/* frozen_batch_norm_backward(dx, dy, weight, running_var, N, C, HW, eps) */
static PyObject *py_frozen_batch_norm_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *ody, *ow, *ov;
    Py_ssize_t n_, c_, hw_;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOOnnnf", &odx, &ody, &ow, &ov, &n_, &c_, &hw_, &eps))
        return NULL;
    DIM(N, n_);
    DIM(C, c_);
    DIM(HW, hw_);
    F32_OUT(dx, odx, (npy_intp)N * C * HW);
    F32_IN(dy, ody, (npy_intp)N * C * HW);
    F32_IN(weight, ow, C);
    F32_IN(running_var, ov, C);
    DAMEX_RUN("frozen_batch_norm_backward",
              frozen_batch_norm_backward(dx, dy, weight, running_var, N, C, HW, eps));
}

/* The sizes tuple of the conv2d bindings:
 * (N, Cin, H, W, Cout, kh, kw, sh, sw, ph, pw[, algorithm]), see conv.h. */
static int conv_shape_from(PyObject *sizes, struct conv2d_shape *s)
{
    Py_ssize_t v[11];
    int algorithm = CONV2D_AUTO;
    if (!PyArg_ParseTuple(sizes, "nnnnnnnnnnn|i", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                          &v[7], &v[8], &v[9], &v[10], &algorithm))
        return -1;
    if (algorithm < CONV2D_AUTO || algorithm > CONV2D_WINOGRAD) {
        PyErr_Format(PyExc_ValueError, "conv2d: unknown algorithm %d", algorithm);
        return -1;
    }
    s->algorithm = algorithm;
    int *f[11] = {&s->N, &s->Cin, &s->H, &s->W, &s->Cout, &s->kh, &s->kw,
                  &s->sh, &s->sw, &s->ph, &s->pw};
    for (int i = 0; i < 11; i++)
        if ((*f[i] = damex_dim(v[i], "conv2d size")) < 0) return -1;
    if (conv2d_shape_init(s) != DAMEX_OK) {
        PyErr_SetString(PyExc_ValueError, "conv2d: sizes out of range or empty output");
        return -1;
    }
    return 0;
}

/* conv2d_forward(y, x, w, b|None, sizes) */
static PyObject *py_conv2d_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox, *ow, *ob, *sizes;
    struct conv2d_shape s;
    if (!PyArg_ParseTuple(args, "OOOOO!", &oy, &ox, &ow, &ob, &PyTuple_Type, &sizes)) return NULL;
    if (conv_shape_from(sizes, &s) < 0) return NULL;
    F32_OUT(y, oy, (npy_intp)s.N * s.Cout * s.Ho * s.Wo);
    F32_IN(x, ox, (npy_intp)s.N * s.Cin * s.H * s.W);
    F32_IN(w, ow, (npy_intp)s.Cout * s.Cin * s.kh * s.kw);
    F32_OPT_IN(b, ob, s.Cout);
    DAMEX_RUN("conv2d_forward", conv2d_forward(y, x, w, b, &s));
}

/* conv2d_backward(dx|None, dw|None, db|None, dy, x, w, sizes) */
static PyObject *py_conv2d_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odw, *odb, *ody, *ox, *ow, *sizes;
    struct conv2d_shape s;
    if (!PyArg_ParseTuple(args, "OOOOOOO!", &odx, &odw, &odb, &ody, &ox, &ow, &PyTuple_Type,
                          &sizes))
        return NULL;
    if (conv_shape_from(sizes, &s) < 0) return NULL;
    F32_OPT_OUT(dx, odx, (npy_intp)s.N * s.Cin * s.H * s.W);
    F32_OPT_OUT(dw, odw, (npy_intp)s.Cout * s.Cin * s.kh * s.kw);
    F32_OPT_OUT(db, odb, s.Cout);
    F32_IN(dy, ody, (npy_intp)s.N * s.Cout * s.Ho * s.Wo);
    F32_IN(x, ox, (npy_intp)s.N * s.Cin * s.H * s.W);
    F32_IN(w, ow, (npy_intp)s.Cout * s.Cin * s.kh * s.kw);
    DAMEX_RUN("conv2d_backward", conv2d_backward(dx, dw, db, dy, x, w, &s));
}

/* sigmoid_forward(y, x) */
static PyObject *py_sigmoid_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox;
    if (!PyArg_ParseTuple(args, "OO", &oy, &ox)) return NULL;
    F32_IN(x, ox, -1);
    F32_OUT(y, oy, damex_size(ox));
    DAMEX_RUN("sigmoid_forward", sigmoid_forward(y, x, (long)damex_size(ox)));
}

/* sigmoid_backward(dx, dy, y) */
static PyObject *py_sigmoid_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *ody, *oy;
    if (!PyArg_ParseTuple(args, "OOO", &odx, &ody, &oy)) return NULL;
    F32_IN(y, oy, -1);
    F32_IN(dy, ody, damex_size(oy));
    F32_OUT(dx, odx, damex_size(oy));
    DAMEX_RUN("sigmoid_backward", sigmoid_backward(dx, dy, y, (long)damex_size(oy)));
}

/* inverse_sigmoid_forward(y, x, eps) */
static PyObject *py_inverse_sigmoid_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox;
    float eps;
    if (!PyArg_ParseTuple(args, "OOf", &oy, &ox, &eps)) return NULL;
    F32_IN(x, ox, -1);
    F32_OUT(y, oy, damex_size(ox));
    DAMEX_RUN("inverse_sigmoid_forward",
              inverse_sigmoid_forward(y, x, (long)damex_size(ox), eps));
}

/* inverse_sigmoid_backward(dx, dy, x, eps) */
static PyObject *py_inverse_sigmoid_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *ody, *ox;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOf", &odx, &ody, &ox, &eps)) return NULL;
    F32_IN(x, ox, -1);
    F32_IN(dy, ody, damex_size(ox));
    F32_OUT(dx, odx, damex_size(ox));
    DAMEX_RUN("inverse_sigmoid_backward",
              inverse_sigmoid_backward(dx, dy, x, (long)damex_size(ox), eps));
}

/* Rows of an array whose last axis has C > 0 entries; -1 with ValueError set. */
static long rows_of(PyObject *o, Py_ssize_t C)
{
    if (C <= 0 || damex_size(o) % C) {
        PyErr_Format(PyExc_ValueError, "softmax: %zd elements are not rows of %zd",
                     (Py_ssize_t)damex_size(o), C);
        return -1;
    }
    return (long)(damex_size(o) / C);
}

/* softmax_forward(y, x, C) */
static PyObject *py_softmax_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox;
    Py_ssize_t C;
    if (!PyArg_ParseTuple(args, "OOn", &oy, &ox, &C)) return NULL;
    F32_IN(x, ox, -1);
    F32_OUT(y, oy, damex_size(ox));
    long R = rows_of(ox, C);
    if (R < 0) return NULL;
    DAMEX_RUN("softmax_forward", softmax_forward(y, x, R, (long)C));
}

/* softmax_backward(dx, dy, y, C) */
static PyObject *py_softmax_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *ody, *oy;
    Py_ssize_t C;
    if (!PyArg_ParseTuple(args, "OOOn", &odx, &ody, &oy, &C)) return NULL;
    F32_IN(y, oy, -1);
    F32_IN(dy, ody, damex_size(oy));
    F32_OUT(dx, odx, damex_size(oy));
    long R = rows_of(oy, C);
    if (R < 0) return NULL;
    DAMEX_RUN("softmax_backward", softmax_backward(dx, dy, y, R, (long)C));
}

/* dropout_forward(y, keep, x, p, seed) */
static PyObject *py_dropout_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ok, *ox;
    float p;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "OOOfK", &oy, &ok, &ox, &p, &seed)) return NULL;
    F32_IN(x, ox, -1);
    F32_OUT(y, oy, damex_size(ox));
    U8_OUT(keep, ok, damex_size(ox));
    DAMEX_RUN("dropout_forward",
              dropout_forward(y, keep, x, (long)damex_size(ox), p, (uint64_t)seed));
}

/* dropout_backward(dx, dy, keep, p) */
static PyObject *py_dropout_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *ody, *ok;
    float p;
    if (!PyArg_ParseTuple(args, "OOOf", &odx, &ody, &ok, &p)) return NULL;
    F32_IN(dy, ody, -1);
    U8_IN(keep, ok, damex_size(ody));
    F32_OUT(dx, odx, damex_size(ody));
    DAMEX_RUN("dropout_backward", dropout_backward(dx, dy, keep, (long)damex_size(ody), p));
}

/* embedding_forward(out, weight, ids, V, D) */
static PyObject *py_embedding_forward(PyObject *self, PyObject *args)
{
    PyObject *oo, *ow, *oi;
    Py_ssize_t V, D;
    if (!PyArg_ParseTuple(args, "OOOnn", &oo, &ow, &oi, &V, &D)) return NULL;
    if (V < 0 || D < 0) return PyErr_Format(PyExc_ValueError, "embedding: negative size");
    I64_IN(ids, oi, -1);
    F32_IN(weight, ow, (npy_intp)V * D);
    F32_OUT(out, oo, damex_size(oi) * D);
    DAMEX_RUN("embedding_forward",
              embedding_forward(out, weight, ids, (long)damex_size(oi), (long)V, (long)D));
}

/* embedding_backward(dweight, dout, ids, V, D) */
static PyObject *py_embedding_backward(PyObject *self, PyObject *args)
{
    PyObject *odw, *odo, *oi;
    Py_ssize_t V, D;
    if (!PyArg_ParseTuple(args, "OOOnn", &odw, &odo, &oi, &V, &D)) return NULL;
    if (V < 0 || D < 0) return PyErr_Format(PyExc_ValueError, "embedding: negative size");
    I64_IN(ids, oi, -1);
    F32_OUT(dweight, odw, (npy_intp)V * D);
    F32_IN(dout, odo, damex_size(oi) * D);
    DAMEX_RUN("embedding_backward",
              embedding_backward(dweight, dout, ids, (long)damex_size(oi), (long)V, (long)D));
}

#define M(name) {#name, py_##name, METH_VARARGS, NULL}
PyMethodDef damex_nn_methods[] = {
    M(linear_forward),     M(linear_backward),
    M(layer_norm_forward), M(layer_norm_backward),
    M(group_norm_forward), M(group_norm_backward),
    M(frozen_batch_norm_forward), M(frozen_batch_norm_backward),
    M(conv2d_forward),     M(conv2d_backward),
    M(sigmoid_forward),    M(sigmoid_backward),
    M(inverse_sigmoid_forward), M(inverse_sigmoid_backward),
    M(softmax_forward),    M(softmax_backward),
    M(dropout_forward),    M(dropout_backward),
    M(embedding_forward),  M(embedding_backward),
    {NULL, NULL, 0, NULL}};
#undef M
