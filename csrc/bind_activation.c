/* Binding of the elementwise activations (csrc/kernels/activation.c). */
#include "binding.h"
#include "activation.h"

/* activation_forward(y, x, act) */
static PyObject *py_activation_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox;
    int act;
    if (!PyArg_ParseTuple(args, "OOi", &oy, &ox, &act)) return NULL;
    F32_IN(x, ox, -1);
    F32_OUT(y, oy, damex_size(ox));
    DAMEX_RUN("activation_forward", activation_forward(y, x, (long)damex_size(ox), act));
}

/* activation_backward(dx, dy, x, act): dx += dy * act'(x) */
static PyObject *py_activation_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *ody, *ox;
    int act;
    if (!PyArg_ParseTuple(args, "OOOi", &odx, &ody, &ox, &act)) return NULL;
    F32_IN(x, ox, -1);
    F32_IN(dy, ody, damex_size(ox));
    F32_OUT(dx, odx, damex_size(ox));
    DAMEX_RUN("activation_backward", activation_backward(dx, dy, x, (long)damex_size(ox), act));
}

PyMethodDef damex_activation_methods[] = {
    {"activation_forward", py_activation_forward, METH_VARARGS, NULL},
    {"activation_backward", py_activation_backward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
