"""Property tests (hypothesis) of masked multi-head attention and multi-scale
deformable attention: random sizes (1 included), masks (fully blocked rows
included), sampling locations on and off the map; values against
damex.testing.reference; inputs never modified."""
import numpy as np

from property_support import Unchanged, close, dims, f32_arrays, hnp, layouts, reference, st
from hypothesis import given

from damex import ops


@given(st.data(), dims(1, 2), dims(1, 5), dims(1, 5), st.sampled_from([1, 2, 4]), dims(1, 3),
       st.booleans(), st.booleans())
def test_attention(data, N, Lq, Lk, H, d, use_am, use_kpm):
    C = H * d
    q, k, v = (data.draw(layouts(data.draw(f32_arrays(s, -3, 3))))
               for s in ((N, Lq, C), (N, Lk, C), (N, Lk, C)))
    am = data.draw(hnp.arrays(bool, (Lq, Lk))) if use_am else None
    kpm = data.draw(hnp.arrays(bool, (N, Lk))) if use_kpm else None
    keep = Unchanged(q, k, v, am, kpm)
    out, attn = ops.attention_forward(q, k, v, H, am, kpm)
    want, p = reference.attention(q, k, v, H, am, kpm)
    close(out, want, 1e-5, 1e-4, "out")
    close(attn, p, 1e-6, 1e-4, "attn")
    dout = data.draw(f32_arrays(out.shape))
    grads = ops.attention_backward(dout, q, k, v, attn, H)
    assert all(np.isfinite(g).all() for g in grads)
    keep.check()


@st.composite
def msda_cases(draw):
    L = draw(dims(1, 3))
    shapes = np.array([[draw(dims(1, 5)), draw(dims(1, 5))] for _ in range(L)], np.int64)
    N, Lq, M, D, P = draw(dims(1, 2)), draw(dims(1, 4)), draw(dims(1, 2)), draw(dims(1, 4)), draw(dims(1, 3))
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = draw(layouts(draw(f32_arrays((N, S, M, D)))))
    loc = draw(f32_arrays((N, Lq, M, L, P, 2), -0.5, 1.5))
    attw = draw(f32_arrays((N, Lq, M, L, P), 0.0, 1.0))
    return value, shapes, loc, attw


@given(msda_cases())
def test_ms_deform_attn(case):
    value, shapes, loc, attw = case
    start = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64)
    keep = Unchanged(value, shapes, start, loc, attw)
    out = ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
    close(out, reference.ms_deform_attn(value, shapes, loc, attw), 1e-5, 1e-5, "msda")
    grads = ops.ms_deform_attn_backward(np.ones_like(out), value, shapes, start, loc, attw)
    assert all(np.isfinite(g).all() for g in grads)
    keep.check()
