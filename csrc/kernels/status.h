/* Status codes every kernel returns; csrc/module.c maps them to exceptions. */
#ifndef DAMEX_STATUS_H
#define DAMEX_STATUS_H

enum damex_status {
    DAMEX_OK = 0,
    DAMEX_EINVAL = 1,     /* an argument is out of range -> ValueError   */
    DAMEX_ENOMEM = 2,     /* scratch allocation failed   -> MemoryError  */
    DAMEX_ENONFINITE = 3, /* NaN or inf in an input      -> ValueError   */
    DAMEX_EINDEX = 4,     /* an index is out of range    -> ValueError   */
    DAMEX_EINTERNAL = 5   /* a broken invariant          -> RuntimeError */
};

#endif
