/* Binding of the box kernels and detection losses (csrc/kernels/box.c);
 * see csrc/binding.h for the conventions. */
#include "binding.h"
#include "box.h"

/* Number of boxes in a float32 buffer of 4-vectors, or -1 with ValueError. */
static long box_count(PyObject *obj, const char *name)
{
    npy_intp n = damex_size(obj);
    if (n % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a multiple of 4 elements, got %zd", name,
                     (Py_ssize_t)n);
        return -1;
    }
    return (long)(n / 4);
}

#define BOX_CONVERSION(NAME)                                                         \
    static PyObject *py_##NAME##_forward(PyObject *self, PyObject *args)             \
    {                                                                                \
        PyObject *oout, *ob;                                                         \
        if (!PyArg_ParseTuple(args, "OO", &oout, &ob)) return NULL;                  \
        F32_IN(b, ob, -1);                                                           \
        long n = box_count(ob, "b");                                                 \
        if (n < 0) return NULL;                                                      \
        F32_OUT(out, oout, 4 * (npy_intp)n);                                         \
        DAMEX_RUN(#NAME "_forward", NAME##_forward(out, b, n));                      \
    }                                                                                \
    static PyObject *py_##NAME##_backward(PyObject *self, PyObject *args)            \
    {                                                                                \
        PyObject *odb, *odout;                                                       \
        if (!PyArg_ParseTuple(args, "OO", &odb, &odout)) return NULL;                \
        F32_IN(dout, odout, -1);                                                     \
        long n = box_count(odout, "dout");                                           \
        if (n < 0) return NULL;                                                      \
        F32_OUT(db, odb, 4 * (npy_intp)n);                                           \
        DAMEX_RUN(#NAME "_backward", NAME##_backward(db, dout, n));                  \
    }

/* box_cxcywh_to_xyxy_forward(out, b), box_cxcywh_to_xyxy_backward(db, dout) */
BOX_CONVERSION(box_cxcywh_to_xyxy)
/* box_xyxy_to_cxcywh_forward(out, b), box_xyxy_to_cxcywh_backward(db, dout) */
BOX_CONVERSION(box_xyxy_to_cxcywh)

/* box_iou_forward(iou, union, a, b, N, M) */
static PyObject *py_box_iou_forward(PyObject *self, PyObject *args)
{
    PyObject *oiou, *ounion, *oa, *ob;
    Py_ssize_t n_, m_;
    if (!PyArg_ParseTuple(args, "OOOOnn", &oiou, &ounion, &oa, &ob, &n_, &m_)) return NULL;
    DIM(N, n_);
    DIM(M, m_);
    F32_IN(a, oa, 4 * (npy_intp)N);
    F32_IN(b, ob, 4 * (npy_intp)M);
    F32_OUT(iou, oiou, (npy_intp)N * M);
    F32_OUT(union_area, ounion, (npy_intp)N * M);
    DAMEX_RUN("box_iou_forward", box_iou_forward(iou, union_area, a, b, N, M));
}

/* generalized_box_iou_forward(giou, a, b, N, M) */
static PyObject *py_generalized_box_iou_forward(PyObject *self, PyObject *args)
{
    PyObject *ogiou, *oa, *ob;
    Py_ssize_t n_, m_;
    if (!PyArg_ParseTuple(args, "OOOnn", &ogiou, &oa, &ob, &n_, &m_)) return NULL;
    DIM(N, n_);
    DIM(M, m_);
    F32_IN(a, oa, 4 * (npy_intp)N);
    F32_IN(b, ob, 4 * (npy_intp)M);
    F32_OUT(giou, ogiou, (npy_intp)N * M);
    DAMEX_RUN("generalized_box_iou_forward", generalized_box_iou_forward(giou, a, b, N, M));
}

/* generalized_box_iou_backward(da, db, dgiou, a, b, N, M): da, db += ... */
static PyObject *py_generalized_box_iou_backward(PyObject *self, PyObject *args)
{
    PyObject *oda, *odb, *odgiou, *oa, *ob;
    Py_ssize_t n_, m_;
    if (!PyArg_ParseTuple(args, "OOOOOnn", &oda, &odb, &odgiou, &oa, &ob, &n_, &m_))
        return NULL;
    DIM(N, n_);
    DIM(M, m_);
    F32_IN(a, oa, 4 * (npy_intp)N);
    F32_IN(b, ob, 4 * (npy_intp)M);
    F32_IN(dgiou, odgiou, (npy_intp)N * M);
    F32_OUT(da, oda, 4 * (npy_intp)N);
    F32_OUT(db, odb, 4 * (npy_intp)M);
    DAMEX_RUN("generalized_box_iou_backward",
              generalized_box_iou_backward(da, db, dgiou, a, b, N, M));
}

/* generalized_box_iou_paired_forward(giou, a, b, n) */
static PyObject *py_generalized_box_iou_paired_forward(PyObject *self, PyObject *args)
{
    PyObject *ogiou, *oa, *ob;
    Py_ssize_t n_;
    if (!PyArg_ParseTuple(args, "OOOn", &ogiou, &oa, &ob, &n_)) return NULL;
    DIM(n, n_);
    F32_IN(a, oa, 4 * (npy_intp)n);
    F32_IN(b, ob, 4 * (npy_intp)n);
    F32_OUT(giou, ogiou, n);
    DAMEX_RUN("generalized_box_iou_paired_forward",
              generalized_box_iou_paired_forward(giou, a, b, n));
}

/* generalized_box_iou_paired_backward(da, db, dgiou, a, b, n): da, db += ... */
static PyObject *py_generalized_box_iou_paired_backward(PyObject *self, PyObject *args)
{
    PyObject *oda, *odb, *odgiou, *oa, *ob;
    Py_ssize_t n_;
    if (!PyArg_ParseTuple(args, "OOOOOn", &oda, &odb, &odgiou, &oa, &ob, &n_)) return NULL;
    DIM(n, n_);
    F32_IN(a, oa, 4 * (npy_intp)n);
    F32_IN(b, ob, 4 * (npy_intp)n);
    F32_IN(dgiou, odgiou, n);
    F32_OUT(da, oda, 4 * (npy_intp)n);
    F32_OUT(db, odb, 4 * (npy_intp)n);
    DAMEX_RUN("generalized_box_iou_paired_backward",
              generalized_box_iou_paired_backward(da, db, dgiou, a, b, n));
}

/* sigmoid_focal_loss_forward(loss, x, t, alpha, gamma) */
static PyObject *py_sigmoid_focal_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *oloss, *ox, *ot;
    float alpha, gamma;
    if (!PyArg_ParseTuple(args, "OOOff", &oloss, &ox, &ot, &alpha, &gamma)) return NULL;
    F32_IN(x, ox, -1);
    F32_IN(t, ot, damex_size(ox));
    F32_OUT(loss, oloss, damex_size(ox));
    DAMEX_RUN("sigmoid_focal_loss_forward",
              sigmoid_focal_loss_forward(loss, x, t, (long)damex_size(ox), alpha, gamma));
}

/* sigmoid_focal_loss_backward(dx, dloss, x, t, alpha, gamma): dx += ... */
static PyObject *py_sigmoid_focal_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odloss, *ox, *ot;
    float alpha, gamma;
    if (!PyArg_ParseTuple(args, "OOOOff", &odx, &odloss, &ox, &ot, &alpha, &gamma)) return NULL;
    F32_IN(x, ox, -1);
    F32_IN(t, ot, damex_size(ox));
    F32_IN(dloss, odloss, damex_size(ox));
    F32_OUT(dx, odx, damex_size(ox));
    DAMEX_RUN("sigmoid_focal_loss_backward",
              sigmoid_focal_loss_backward(dx, dloss, x, t, (long)damex_size(ox), alpha, gamma));
}

/* l1_loss_forward(out, a, b) */
static PyObject *py_l1_loss_forward(PyObject *self, PyObject *args)
{
    PyObject *oout, *oa, *ob;
    if (!PyArg_ParseTuple(args, "OOO", &oout, &oa, &ob)) return NULL;
    F32_IN(a, oa, -1);
    F32_IN(b, ob, damex_size(oa));
    F32_OUT(out, oout, damex_size(oa));
    DAMEX_RUN("l1_loss_forward", l1_loss_forward(out, a, b, (long)damex_size(oa)));
}

/* l1_loss_backward(da, db, dout, a, b): da, db += ... */
static PyObject *py_l1_loss_backward(PyObject *self, PyObject *args)
{
    PyObject *oda, *odb, *odout, *oa, *ob;
    if (!PyArg_ParseTuple(args, "OOOOO", &oda, &odb, &odout, &oa, &ob)) return NULL;
    F32_IN(a, oa, -1);
    F32_IN(b, ob, damex_size(oa));
    F32_IN(dout, odout, damex_size(oa));
    F32_OUT(da, oda, damex_size(oa));
    F32_OUT(db, odb, damex_size(oa));
    DAMEX_RUN("l1_loss_backward", l1_loss_backward(da, db, dout, a, b, (long)damex_size(oa)));
}

PyMethodDef damex_box_methods[] = {
    {"box_cxcywh_to_xyxy_forward", py_box_cxcywh_to_xyxy_forward, METH_VARARGS, NULL},
    {"box_cxcywh_to_xyxy_backward", py_box_cxcywh_to_xyxy_backward, METH_VARARGS, NULL},
    {"box_xyxy_to_cxcywh_forward", py_box_xyxy_to_cxcywh_forward, METH_VARARGS, NULL},
    {"box_xyxy_to_cxcywh_backward", py_box_xyxy_to_cxcywh_backward, METH_VARARGS, NULL},
    {"box_iou_forward", py_box_iou_forward, METH_VARARGS, NULL},
    {"generalized_box_iou_forward", py_generalized_box_iou_forward, METH_VARARGS, NULL},
    {"generalized_box_iou_backward", py_generalized_box_iou_backward, METH_VARARGS, NULL},
    {"generalized_box_iou_paired_forward", py_generalized_box_iou_paired_forward, METH_VARARGS,
     NULL},
    {"generalized_box_iou_paired_backward", py_generalized_box_iou_paired_backward, METH_VARARGS,
     NULL},
    {"sigmoid_focal_loss_forward", py_sigmoid_focal_loss_forward, METH_VARARGS, NULL},
    {"sigmoid_focal_loss_backward", py_sigmoid_focal_loss_backward, METH_VARARGS, NULL},
    {"l1_loss_forward", py_l1_loss_forward, METH_VARARGS, NULL},
    {"l1_loss_backward", py_l1_loss_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
