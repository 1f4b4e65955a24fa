/* Binding of the router kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_router_methods[] = {
    {NULL, NULL, 0, NULL}};
