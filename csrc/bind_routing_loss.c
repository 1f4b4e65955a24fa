/* Binding of the routing_loss kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_routing_loss_methods[] = {
    {NULL, NULL, 0, NULL}};
