/* The damex._C extension: shared binding helpers and the module table, which
 * joins the method tables of every kernel family (csrc/bind_*.c). */
#define DAMEX_MODULE_C
#include "binding.h"
#include "blas.h"

#ifdef _OPENMP
#include <omp.h>
#endif

void *damex_buffer(PyObject *obj, const char *name, int typenum, npy_intp n, int writeable)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous aligned array", name);
        return NULL;
    }
    if (n >= 0 && PyArray_SIZE(a) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd elements, got %zd", name, (Py_ssize_t)n,
                     (Py_ssize_t)PyArray_SIZE(a));
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: output array is not writeable", name);
        return NULL;
    }
    return PyArray_DATA(a);
}

npy_intp damex_size(PyObject *obj) { return PyArray_SIZE((PyArrayObject *)obj); }

int damex_dim(Py_ssize_t v, const char *name)
{
    if (v < 0 || v > 2147483647) {
        PyErr_Format(PyExc_ValueError, "%s: size %zd out of range", name, v);
        return -1;
    }
    return (int)v;
}

PyObject *damex_raise(int status, const char *kernel)
{
    switch (status) {
    case DAMEX_EINVAL:
        PyErr_Format(PyExc_ValueError, "%s: invalid argument", kernel);
        break;
    case DAMEX_ENOMEM:
        PyErr_Format(PyExc_MemoryError, "%s: out of memory", kernel);
        break;
    case DAMEX_ENONFINITE:
        PyErr_Format(PyExc_ValueError, "%s: input contains NaN or inf", kernel);
        break;
    case DAMEX_EINDEX:
        PyErr_Format(PyExc_ValueError, "%s: index out of range", kernel);
        break;
    default:
        PyErr_Format(PyExc_RuntimeError, "%s: internal error (status %d)", kernel, status);
    }
    return NULL;
}

/* ---- threads ---------------------------------------------------------- */

#ifdef DAMEX_BLAS_SCIPY
void scipy_openblas_set_num_threads(int);
int scipy_openblas_get_num_threads(void);
#else
void openblas_set_num_threads(int);
int openblas_get_num_threads(void);
#endif

static PyObject *py_set_num_threads(PyObject *self, PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "set_num_threads: n must be >= 1");
        return NULL;
    }
    DAMEX_OPENBLAS(set_num_threads)(n);
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *args)
{
    int omp = 1;
#ifdef _OPENMP
    omp = omp_get_max_threads();
#endif
    return Py_BuildValue("(ii)", DAMEX_OPENBLAS(get_num_threads)(), omp);
}

/* C[M,N] = A[M,K] @ B[K,N]: the machine's sgemm rate, for benchmarks. */
static PyObject *py_sgemm(PyObject *self, PyObject *args)
{
    PyObject *oc, *oa, *ob;
    Py_ssize_t m_, n_, k_;
    if (!PyArg_ParseTuple(args, "OOOnnn", &oc, &oa, &ob, &m_, &n_, &k_)) return NULL;
    DIM(M, m_);
    DIM(N, n_);
    DIM(K, k_);
    F32_OUT(c, oc, (npy_intp)M * N);
    F32_IN(a, oa, (npy_intp)M * K);
    F32_IN(b, ob, (npy_intp)K * N);
    Py_BEGIN_ALLOW_THREADS sgemm_rm(0, 0, M, N, K, 1.0f, a, K, b, N, 0.0f, c, N);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "Set OpenBLAS and OpenMP threads."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "(openblas_threads, openmp_threads)."},
    {"sgemm", py_sgemm, METH_VARARGS, "sgemm(c, a, b, M, N, K): c = a @ b, row-major."},
    {NULL, NULL, 0, NULL}};

static PyMethodDef *families[] = {core_methods,           damex_activation_methods,
                                  damex_router_methods,   damex_moe_methods,
                                  damex_routing_loss_methods,
                                  damex_nn_methods,       damex_attention_methods,
                                  damex_msda_methods,     damex_box_methods,
                                  damex_optim_methods,    NULL};

static struct PyModuleDef damex_module = {PyModuleDef_HEAD_INIT, "damex._C",
                                          "The damex C core (see damex.ops for the documented API).",
                                          -1, NULL};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    PyObject *m = PyModule_Create(&damex_module);
    if (!m) return NULL;
    for (PyMethodDef **fam = families; *fam; fam++) {
        if (PyModule_AddFunctions(m, *fam) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
