/* Binding of the nn kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_nn_methods[] = {
    {NULL, NULL, 0, NULL}};
