/* Binding of the optim kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_optim_methods[] = {
    {NULL, NULL, 0, NULL}};
