"""The declarative binding (csrc/kernels.spec expanded by csrc/bindgen.py)."""
import inspect
import os
import sys

import numpy as np
import pytest

from damex import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
bindgen = pytest.importorskip("bindgen")


def spec():
    with open(os.path.join(ROOT, "csrc", "kernels.spec")) as f:
        return bindgen.parse(f.read())[1]


def test_every_spec_kernel_is_an_entry_point_with_its_signature_and_docstring():
    kernels = spec()
    assert len(kernels) > 50
    for k in kernels:
        fn = getattr(_C, k.name)
        params = list(inspect.signature(fn).parameters)
        assert params == [a.name for a in k.args if a.python], k.name
        assert k.summary in fn.__doc__


def test_every_entry_point_has_a_signature_and_docstring():
    for name in dir(_C):
        fn = getattr(_C, name)
        if callable(fn) and not name.startswith("_"):
            inspect.signature(fn)
            assert fn.__doc__ and fn.__doc__.strip(), name


def test_checks_name_the_kernel_and_the_argument():
    f = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=r"softmax_forward: x: expected a multiple of 4"):
        _C.softmax_forward(f, f, 4)
    with pytest.raises(ValueError, match=r"softmax_forward: C = 0 out of range \[1, "):
        _C.softmax_forward(f, f, 0)
    with pytest.raises(TypeError, match=r"linear_forward: b: expected a numpy.ndarray or None"):
        _C.linear_forward(f, f, np.zeros(9, np.float32), 3, 2, 3, 3)
    with pytest.raises(ValueError, match=r"sigmoid_forward: y: output array is not writeable"):
        y = np.zeros(6, np.float32)
        y.flags.writeable = False
        _C.sigmoid_forward(y, f)
    with pytest.raises(ValueError, match="more elements than an array holds"):
        big = 2**31 - 1  # out[N*Lq*M*D] would overflow int64
        _C.ms_deform_attn_forward(f, f, f, f, f, f, big, 1, big, big, big, 1, 1)
    with pytest.raises(TypeError, match="router_backward"):
        _C.router_backward(f)


def test_malformed_spec_is_refused_with_its_line():
    bad = "kernel k: s.\n    in f32 x[n*m]\n    count n\n"
    with pytest.raises(bindgen.SpecError, match=r"spec:2: m in x\[n\*m\]"):
        bindgen.parse(bad, "spec")
    with pytest.raises(bindgen.SpecError, match=r"spec:3: bound E of k"):
        bindgen.parse("kernel k: s.\n    dim T\n    dim k 1..E\n", "spec")


def test_let_and_call_for_kernels_whose_c_arguments_differ():
    text = """include pool.h
kernel maxpool2d_forward: y = max_pool2d(x).
    out f32 y[N*C*Ho*Wo]
    in  f32 x[N*C*H*W]
    dim N
    dim C
    dim H
    dim W
    int kh
    int sh
    let Ho = maxpool2d_out_size(H, kh, sh, 0): invalid kernel/stride
    let Wo = maxpool2d_out_size(W, kh, sh, 0): invalid kernel/stride
    call y, x, (long)N * C, H, W, kh, sh
"""
    c = bindgen.render(*bindgen.parse(text, "spec"))
    assert "long Ho = maxpool2d_out_size(H, kh, sh, 0);" in c
    assert 'if (Ho < 0) return damex_invalid("maxpool2d_forward", "invalid kernel/stride");' in c
    assert "maxpool2d_forward(y, x, (long)N * C, H, W, kh, sh)" in c
    assert "damex_mul(damex_mul(damex_mul((npy_intp)N, C), Ho), Wo)" in c
    assert "maxpool2d_forward($module, y, x, N, C, H, W, kh, sh, /)" in c
