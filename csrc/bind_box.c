/* Binding of the box kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_box_methods[] = {
    {NULL, NULL, 0, NULL}};
