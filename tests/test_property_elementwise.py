"""Property tests (hypothesis) of the elementwise families: activations, sigmoid,
inverse sigmoid, softmax, dropout, embedding; random shapes (0 and 1 included),
layouts, NaN/inf; values against damex.testing.reference; inputs never modified."""
import numpy as np
import pytest

from property_support import (Unchanged, close, dims, f32_arrays, floats, hnp, layouts,
                              reference, st)
from hypothesis import given

from damex import ops

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)


@given(st.data(), st.sampled_from(ops.ACTIVATIONS), shapes)
def test_activation_forward_backward(data, act, shape):
    x = data.draw(layouts(data.draw(f32_arrays(shape, -30, 30))))
    dy = data.draw(f32_arrays(shape))
    keep = Unchanged(x, dy)
    y = ops.activation_forward(x, act)
    assert y.dtype == np.float32 and y.shape == shape
    close(y, reference.activation(x, act), 2e-6, 2e-6, act)
    dx = ops.activation_backward(dy, x, act)
    assert dx.shape == shape and np.isfinite(dx).all()
    keep.check()


@given(st.sampled_from(ops.ACTIVATIONS), shapes)
def test_activation_keeps_nan(act, shape):
    """NaN stays NaN (relu(NaN) is NaN in torch)."""
    x = np.full(shape, np.nan, np.float32)
    assert np.isnan(ops.activation_forward(x, act)).all()


@given(st.sampled_from(["gelu", "gelu_tanh"]), floats(2e11, 3e38), st.booleans())
def test_gelu_backward_at_huge_inputs(act, mag, negative):
    """The derivative is 0 far left and 1 far right."""
    x = np.array([-mag if negative else mag], np.float32)
    dx = ops.activation_backward(np.ones(1, np.float32), x, act)
    close(dx, [0.0 if negative else 1.0], 1e-6, 0)


@given(st.sampled_from(["activation", "sigmoid"]), floats())
def test_zero_d_arrays_keep_their_shape(which, v):
    x = np.array(v, np.float32)
    y = ops.activation_forward(x, "relu") if which == "activation" else ops.sigmoid_forward(x)
    assert y.shape == ()


@given(st.data(), shapes)
def test_sigmoid_and_inverse(data, shape):
    x = data.draw(layouts(data.draw(f32_arrays(shape, -60, 60))))
    keep = Unchanged(x)
    y = ops.sigmoid_forward(x)
    close(y, reference.sigmoid(x), 1e-7, 1e-5, "sigmoid")
    dy = np.ones(shape, np.float32)
    close(ops.sigmoid_backward(dy, y), y.astype(np.float64) * (1 - y), 1e-7, 1e-5, "sigmoid'")
    u = data.draw(f32_arrays(shape, -0.5, 1.5))
    close(ops.inverse_sigmoid_forward(u), reference.inverse_sigmoid(u), 1e-5, 1e-5, "inverse")
    keep.check()


@given(st.data(), hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
def test_softmax(data, shape):
    x = data.draw(layouts(data.draw(f32_arrays(shape, -80, 80))))
    keep = Unchanged(x)
    y = ops.softmax_forward(x)
    close(y, reference.softmax(x), 1e-6, 1e-5, "softmax")
    close(y.sum(-1), np.ones(shape[:-1]), 1e-5, 0, "sum")
    dy = data.draw(f32_arrays(shape))
    y64 = reference.softmax(x)
    want = y64 * (dy - (dy * y64).sum(-1, keepdims=True))
    close(ops.softmax_backward(dy, y), want, 1e-5, 1e-4, "softmax'")
    keep.check()


@given(st.data(), shapes, st.sampled_from([0.0, 0.1, 0.5, 0.9]), st.integers(0, 2 ** 32))
def test_dropout(data, shape, p, seed):
    x = data.draw(layouts(data.draw(f32_arrays(shape))))
    keep = Unchanged(x)
    y, mask = ops.dropout_forward(x, p, seed)
    assert y.shape == shape
    m = np.asarray(mask, bool).reshape(shape)
    close(y, np.where(m, x.astype(np.float64) / (1 - p), 0), 1e-6, 1e-6, "dropout")
    if p == 0:
        assert m.all()
    y2, _ = ops.dropout_forward(x, p, seed)
    np.testing.assert_array_equal(y, y2)  # same seed, same mask
    keep.check()


@given(st.data(), dims(1, 6), dims(0, 5), hnp.array_shapes(min_dims=1, max_dims=2, min_side=0,
                                                           max_side=4))
def test_embedding(data, V, D, ids_shape):
    w = data.draw(layouts(data.draw(f32_arrays((V, D)))))
    ids = data.draw(hnp.arrays(np.int64, ids_shape, elements=st.integers(0, V - 1)))
    keep = Unchanged(w, ids)
    out = ops.embedding_forward(w, ids)
    np.testing.assert_array_equal(out, w[ids])
    keep.check()
    bad = ids.copy()
    if bad.size:
        bad.flat[0] = data.draw(st.sampled_from([-1, V, 2 ** 40]))
        with pytest.raises((ValueError, IndexError)):
            ops.embedding_forward(w, bad)
