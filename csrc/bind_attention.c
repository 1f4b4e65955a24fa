/* Binding of the attention kernels (see csrc/binding.h for the conventions). */
#include "binding.h"

PyMethodDef damex_attention_methods[] = {
    {NULL, NULL, 0, NULL}};
