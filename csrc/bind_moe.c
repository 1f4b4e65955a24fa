/* Binding of the moe kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_moe_methods[] = {
    {NULL, NULL, 0, NULL}};
