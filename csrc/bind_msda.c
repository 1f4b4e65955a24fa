/* Binding of the msda kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_msda_methods[] = {
    {NULL, NULL, 0, NULL}};
