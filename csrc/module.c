/* The damex._C extension: the binding helpers (binding.h), the hand-written
 * entry points (threads, sgemm) and the module table, which joins the
 * generated kernel entry points (csrc/kernels.spec) and conv2d (bind_conv.c). */
#define DAMEX_MODULE_C
#include "binding.h"
#include "blas.h"

void *damex_buffer(PyObject *obj, const char *kernel, const char *name, int typenum, npy_intp n,
                   int flags)
{
    if ((flags & DAMEX_OPTIONAL) && obj == Py_None) return NULL;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s: expected a numpy.ndarray%s, got %s", kernel, name,
                     (flags & DAMEX_OPTIONAL) ? " or None" : "", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: %s: expected dtype %S, got %S", kernel, name,
                     (PyObject *)want, (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s: expected a C-contiguous aligned array", kernel,
                     name);
        return NULL;
    }
    if (n == NPY_MAX_INTP) {
        PyErr_Format(PyExc_ValueError, "%s: %s: the sizes give more elements than an array holds",
                     kernel, name);
        return NULL;
    }
    if (n >= 0 && PyArray_SIZE(a) != n) {
        PyErr_Format(PyExc_ValueError, "%s: %s: expected %zd elements, got %zd", kernel, name,
                     (Py_ssize_t)n, (Py_ssize_t)PyArray_SIZE(a));
        return NULL;
    }
    if ((flags & DAMEX_OUT) && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s: output array is not writeable", kernel, name);
        return NULL;
    }
    return PyArray_DATA(a);
}

int damex_count(npy_intp *count, PyObject *obj, npy_intp per, const char *kernel,
                const char *name)
{
    npy_intp n = PyArray_SIZE((PyArrayObject *)obj);
    if (per == NPY_MAX_INTP || (per == 0 && n != 0) || (per > 0 && n % per)) {
        PyErr_Format(PyExc_ValueError, "%s: %s: expected a multiple of %zd elements, got %zd",
                     kernel, name, (Py_ssize_t)per, (Py_ssize_t)n);
        return -1;
    }
    *count = per > 0 ? n / per : 0;
    return 0;
}

int damex_dim(int *out, Py_ssize_t v, long lo, long hi, const char *kernel, const char *name)
{
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s: %s = %zd out of range [%ld, %ld]", kernel, name, v, lo,
                     hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

PyObject *damex_invalid(const char *kernel, const char *message)
{
    PyErr_Format(PyExc_ValueError, "%s: %s", kernel, message);
    return NULL;
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

/* ---- hand-written entry points ---------------------------------------------- */

static PyObject *py_set_num_threads(PyObject *self, PyObject *args)
{
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "n:set_num_threads", &n)) return NULL;
    if (n < 1 || n > damex_threads_max()) {
        PyErr_Format(PyExc_ValueError,
                     "set_num_threads: n must be in [1, %d] (4 x the %d CPUs this process may "
                     "use), got %zd",
                     damex_threads_max(), damex_threads_cpus(), n);
        return NULL;
    }
    damex_threads_set((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *args)
{
    int blas, omp;
    damex_threads_get(&blas, &omp);
    return Py_BuildValue("(ii)", blas, omp);
}

static PyObject *py_max_num_threads(PyObject *self, PyObject *args)
{
    return PyLong_FromLong(damex_threads_max());
}

/* C[M,N] = A[M,K] @ B[K,N]: the machine's sgemm rate, for benchmarks. */
static int sgemm_call(float *c, const float *a, const float *b, int M, int N, int K)
{
    sgemm_rm(0, 0, M, N, K, 1.0f, a, K, b, N, 0.0f, c, N);
    return DAMEX_OK;
}

static PyObject *py_sgemm(PyObject *self, PyObject *args)
{
    PyObject *oc, *oa, *ob;
    Py_ssize_t m_, n_, k_;
    if (!PyArg_ParseTuple(args, "OOOnnn:sgemm", &oc, &oa, &ob, &m_, &n_, &k_)) return NULL;
    int M, N, K;
    if (damex_dim(&M, m_, 0, INT_MAX, "sgemm", "M") < 0 ||
        damex_dim(&N, n_, 0, INT_MAX, "sgemm", "N") < 0 ||
        damex_dim(&K, k_, 0, INT_MAX, "sgemm", "K") < 0)
        return NULL;
    DAMEX_BUFFER(float, c, oc, "sgemm", NPY_FLOAT32, damex_mul(M, N), DAMEX_OUT);
    DAMEX_BUFFER(const float, a, oa, "sgemm", NPY_FLOAT32, damex_mul(M, K), DAMEX_IN);
    DAMEX_BUFFER(const float, b, ob, "sgemm", NPY_FLOAT32, damex_mul(K, N), DAMEX_IN);
    DAMEX_RUN("sgemm", sgemm_call(c, a, b, M, N, K));
}

static PyMethodDef core_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_VARARGS,
     "set_num_threads($module, n, /)\n--\n\nStore n threads for OpenBLAS and OpenMP, for every "
     "thread of the process (1 <= n <= max_num_threads())."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS,
     "get_num_threads($module, /)\n--\n\nThe stored (openblas_threads, openmp_threads)."},
    {"max_num_threads", py_max_num_threads, METH_NOARGS,
     "max_num_threads($module, /)\n--\n\nThe largest count set_num_threads accepts: 4 x the "
     "CPUs this process may use."},
    {"sgemm", py_sgemm, METH_VARARGS,
     "sgemm($module, c, a, b, M, N, K, /)\n--\n\nc[M,N] = a[M,K] @ b[K,N], row-major (for "
     "benchmarks)."},
    {NULL, NULL, 0, NULL}};

static PyMethodDef *families[] = {core_methods, damex_kernel_methods, damex_conv_methods, NULL};

static struct PyModuleDef damex_module = {PyModuleDef_HEAD_INIT, "damex._C",
                                          "The damex C core (see damex.ops for the documented API).",
                                          -1, NULL};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    damex_threads_init();
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
