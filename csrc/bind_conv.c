/* Binding of conv2d (csrc/kernels/conv.c), written by hand: its sizes come as
 * one tuple (N, Cin, H, W, Cout, kh, kw, sh, sw, ph, pw[, algorithm]) and are
 * checked by conv2d_shape_init.  The other kernels: csrc/kernels.spec. */
#include "binding.h"
#include "conv.h"

static int conv_shape_from(PyObject *sizes, struct conv2d_shape *s)
{
    static const char *names[11] = {"N", "Cin", "H", "W", "Cout", "kh", "kw",
                                    "sh", "sw", "ph", "pw"};
    Py_ssize_t v[11];
    int algorithm = CONV2D_AUTO;
    if (!PyArg_ParseTuple(sizes, "nnnnnnnnnnn|i:conv2d sizes", &v[0], &v[1], &v[2], &v[3], &v[4],
                          &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &algorithm))
        return -1;
    if (algorithm < CONV2D_AUTO || algorithm > CONV2D_WINOGRAD) {
        PyErr_Format(PyExc_ValueError, "conv2d: unknown algorithm %d", algorithm);
        return -1;
    }
    s->algorithm = algorithm;
    int *f[11] = {&s->N, &s->Cin, &s->H, &s->W, &s->Cout, &s->kh, &s->kw,
                  &s->sh, &s->sw, &s->ph, &s->pw};
    for (int i = 0; i < 11; i++)
        if (damex_dim(f[i], v[i], 0, INT_MAX, "conv2d", names[i]) < 0) return -1;
    if (conv2d_shape_init(s) != DAMEX_OK) {
        PyErr_SetString(PyExc_ValueError, "conv2d: sizes out of range or empty output");
        return -1;
    }
    return 0;
}

/* The element counts of x, w, y (for the checks below). */
#define CONV_X(s) damex_mul(damex_mul(damex_mul((s).N, (s).Cin), (s).H), (s).W)
#define CONV_W(s) damex_mul(damex_mul(damex_mul((s).Cout, (s).Cin), (s).kh), (s).kw)
#define CONV_Y(s) damex_mul(damex_mul(damex_mul((s).N, (s).Cout), (s).Ho), (s).Wo)

/* conv2d_forward(y, x, w, b|None, sizes) */
static PyObject *py_conv2d_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox, *ow, *ob, *sizes;
    struct conv2d_shape s;
    if (!PyArg_ParseTuple(args, "OOOOO!:conv2d_forward", &oy, &ox, &ow, &ob, &PyTuple_Type,
                          &sizes))
        return NULL;
    if (conv_shape_from(sizes, &s) < 0) return NULL;
    const char *K = "conv2d_forward";
    DAMEX_BUFFER(float, y, oy, K, NPY_FLOAT32, CONV_Y(s), DAMEX_OUT);
    DAMEX_BUFFER(const float, x, ox, K, NPY_FLOAT32, CONV_X(s), DAMEX_IN);
    DAMEX_BUFFER(const float, w, ow, K, NPY_FLOAT32, CONV_W(s), DAMEX_IN);
    DAMEX_BUFFER(const float, b, ob, K, NPY_FLOAT32, s.Cout, DAMEX_IN | DAMEX_OPTIONAL);
    DAMEX_RUN(K, conv2d_forward(y, x, w, b, &s));
}

/* conv2d_backward(dx|None, dw|None, db|None, dy, x, w, sizes) */
static PyObject *py_conv2d_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odw, *odb, *ody, *ox, *ow, *sizes;
    struct conv2d_shape s;
    if (!PyArg_ParseTuple(args, "OOOOOOO!:conv2d_backward", &odx, &odw, &odb, &ody, &ox, &ow,
                          &PyTuple_Type, &sizes))
        return NULL;
    if (conv_shape_from(sizes, &s) < 0) return NULL;
    const char *K = "conv2d_backward";
    DAMEX_BUFFER(float, dx, odx, K, NPY_FLOAT32, CONV_X(s), DAMEX_OUT | DAMEX_OPTIONAL);
    DAMEX_BUFFER(float, dw, odw, K, NPY_FLOAT32, CONV_W(s), DAMEX_OUT | DAMEX_OPTIONAL);
    DAMEX_BUFFER(float, db, odb, K, NPY_FLOAT32, s.Cout, DAMEX_OUT | DAMEX_OPTIONAL);
    DAMEX_BUFFER(const float, dy, ody, K, NPY_FLOAT32, CONV_Y(s), DAMEX_IN);
    DAMEX_BUFFER(const float, x, ox, K, NPY_FLOAT32, CONV_X(s), DAMEX_IN);
    DAMEX_BUFFER(const float, w, ow, K, NPY_FLOAT32, CONV_W(s), DAMEX_IN);
    DAMEX_RUN(K, conv2d_backward(dx, dw, db, dy, x, w, &s));
}

PyMethodDef damex_conv_methods[] = {
    {"conv2d_forward", py_conv2d_forward, METH_VARARGS,
     "conv2d_forward($module, y, x, w, b, sizes, /)\n--\n\ny = conv2d(x, w) + b; sizes = (N, "
     "Cin, H, W, Cout, kh, kw, sh, sw, ph, pw[, algorithm]), b may be None."},
    {"conv2d_backward", py_conv2d_backward, METH_VARARGS,
     "conv2d_backward($module, dx, dw, db, dy, x, w, sizes, /)\n--\n\ndx, dw, db += the "
     "gradients of conv2d (each may be None); sizes as conv2d_forward."},
    {NULL, NULL, 0, NULL}};
