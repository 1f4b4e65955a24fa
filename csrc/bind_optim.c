/* Binding of the optim kernels (csrc/kernels/optim.c); see csrc/binding.h
 * for the conventions. */
#include "binding.h"
#include "optim.h"

/* adamw_step(param, exp_avg, exp_avg_sq, grad, step, lr, beta1, beta2, eps, weight_decay):
 * updates the first three in place */
static PyObject *py_adamw_step(PyObject *self, PyObject *args)
{
    PyObject *oparam, *oexp_avg, *oexp_avg_sq, *ograd;
    long long step;
    double lr, beta1, beta2, eps, wd;
    if (!PyArg_ParseTuple(args, "OOOOLddddd", &oparam, &oexp_avg, &oexp_avg_sq, &ograd, &step,
                          &lr, &beta1, &beta2, &eps, &wd))
        return NULL;
    F32_OUT(param, oparam, -1);
    npy_intp n = damex_size(oparam);
    F32_OUT(exp_avg, oexp_avg, n);
    F32_OUT(exp_avg_sq, oexp_avg_sq, n);
    F32_IN(grad, ograd, n);
    if (param == exp_avg || param == exp_avg_sq || exp_avg == exp_avg_sq) {
        PyErr_SetString(PyExc_ValueError, "adamw_step: param, exp_avg and exp_avg_sq must be "
                                          "distinct arrays");
        return NULL;
    }
    DAMEX_RUN("adamw_step", adamw_step(param, exp_avg, exp_avg_sq, grad, (long)n, (long)step, lr,
                                       beta1, beta2, eps, wd));
}

/* sum_of_squares(x) -> float: sum of x^2 in double */
static PyObject *py_sum_of_squares(PyObject *self, PyObject *args)
{
    PyObject *ox;
    if (!PyArg_ParseTuple(args, "O", &ox)) return NULL;
    F32_IN(x, ox, -1);
    double s = 0.0;
    int status;
    Py_BEGIN_ALLOW_THREADS status = sum_of_squares(&s, x, (long)damex_size(ox));
    Py_END_ALLOW_THREADS
    if (status != DAMEX_OK) return damex_raise(status, "sum_of_squares");
    return PyFloat_FromDouble(s);
}

PyMethodDef damex_optim_methods[] = {
    {"adamw_step", py_adamw_step, METH_VARARGS, NULL},
    {"sum_of_squares", py_sum_of_squares, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};
