"""Masked multi-head attention: a float64 NumPy reference, central
differences, PyTorch parity with every mask combination, DINO's denoising
mask, fully blocked rows, bad input, flat memory; F.scaled_dot_product_attention
and float64 torch gradients under DINO's full denoising mask."""
import numpy as np
import pytest

from damex import ops
from helpers import assert_close, assert_memory_flat, numeric_grad, torch_or_skip, unchanged
from damex.testing import torch_twins
from damex.testing.reference import attention as ref_attention


def qkv(N=2, Lq=5, Lk=7, C=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, Lq, C)).astype(np.float32), rng.normal(size=(N, Lk, C)).astype(np.float32),
            rng.normal(size=(N, Lk, C)).astype(np.float32))


def masks(N, Lq, Lk, seed=1):
    rng = np.random.default_rng(seed)
    am = rng.random((Lq, Lk)) < 0.3
    kpm = rng.random((N, Lk)) < 0.2
    return am, kpm


@pytest.mark.parametrize("which", ["none", "attn", "kpm", "both"])
@pytest.mark.parametrize("H", [1, 2, 4])
def test_forward_matches_reference(which, H):
    q, k, v = qkv()
    am, kpm = masks(2, 5, 7)
    am = am if which in ("attn", "both") else None
    kpm = kpm if which in ("kpm", "both") else None
    out, attn = ops.attention_forward(q, k, v, H, attn_mask=am, key_padding_mask=kpm)
    ro, rp = ref_attention(q, k, v, H, am, kpm)
    assert_close(out, ro, atol=1e-5, rtol=1e-4, name="out")
    assert_close(attn, rp, atol=1e-6, rtol=1e-4, name="attn")


@pytest.mark.parametrize("H", [1, 2])
def test_backward_matches_central_differences(H):
    q, k, v = qkv(N=2, Lq=3, Lk=4, C=4, seed=3)
    am = np.array([[0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], bool)  # row 1 fully blocked
    kpm = np.array([[0, 0, 0, 0], [0, 0, 1, 0]], bool)
    dout = np.random.default_rng(4).normal(size=q.shape)
    _, attn = ops.attention_forward(q, k, v, H, attn_mask=am, key_padding_mask=kpm)
    dq, dk, dv = ops.attention_backward(dout.astype(np.float32), q, k, v, attn, H)
    for arr, got, name in ((q, dq, "dq"), (k, dk, "dk"), (v, dv, "dv")):
        def f(x, name=name):
            args = {"q": q, "k": k, "v": v}
            args[name[1]] = x
            return (ref_attention(args["q"], args["k"], args["v"], H, am, kpm)[0] * dout).sum()
        assert_close(got, numeric_grad(f, arr.astype(np.float64)), atol=1e-4, rtol=1e-3, name=name)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 2), (2, 5, 7, 8, 2), (3, 40, 33, 32, 4), (2, 120, 120, 64, 8)])
def test_parity_with_torch(shape):
    torch = torch_or_skip()
    N, Lq, Lk, C, H = shape
    q, k, v = qkv(N, Lq, Lk, C, seed=5)
    am, kpm = masks(N, Lq, Lk, seed=6)
    am[:, 0] = False  # torch gives NaN on fully blocked rows: keep one key open
    kpm[:, 0] = False
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout, _ = torch_twins.attention(tq, tk, tv, H, am, kpm)
    dout = np.random.default_rng(7).normal(size=tout.shape).astype(np.float32)
    tout.backward(torch.tensor(dout))
    out, attn = ops.attention_forward(q, k, v, H, attn_mask=am, key_padding_mask=kpm)
    assert_close(out, tout.detach().numpy(), atol=2e-5, rtol=1e-4, name="out")
    grads = ops.attention_backward(dout, q, k, v, attn, H)
    for got, t, name in zip(grads, (tq, tk, tv), ("dq", "dk", "dv")):
        assert_close(got, t.grad.numpy(), atol=5e-5, rtol=1e-3, name=name)


def test_dino_denoising_mask_keeps_groups_apart():
    """With DINO's mask, changing a denoising group's keys changes neither the other
    group's outputs nor the matching queries' outputs."""
    pad, groups, nq, C = 8, 2, 3, 8
    am = np.zeros((pad + nq, pad + nq), bool)   # DINO's CDN mask, built by hand
    am[pad:, :pad] = True                        # matching queries do not see denoising ones
    am[:4, 4:pad] = True                         # group 0 does not see group 1 ...
    am[4:pad, :4] = True                         # ... nor group 1 group 0
    L = pad + nq
    q, k, v = qkv(N=1, Lq=L, Lk=L, C=C, seed=8)
    out, _ = ops.attention_forward(q, k, v, 2, attn_mask=am)
    k2, v2 = k.copy(), v.copy()
    k2[:, :4] += 1.0   # group 0
    v2[:, :4] += 1.0
    out2, _ = ops.attention_forward(q, k2, v2, 2, attn_mask=am)
    assert_close(out2[:, 4:], out[:, 4:], atol=0, rtol=0)   # group 1 and matching queries
    assert np.abs(out2[:, :4] - out[:, :4]).max() > 1e-3


def test_fully_blocked_rows_give_zero_and_single_token():
    q, k, v = qkv(N=1, Lq=2, Lk=3, C=4)
    am = np.array([[True, True, True], [False, True, False]])
    out, attn = ops.attention_forward(q, k, v, 2, attn_mask=am)
    assert (out[0, 0] == 0).all() and (attn[0, :, 0] == 0).all()
    assert_close(attn[0, :, 1].sum(-1), [1.0, 1.0])
    dq, dk, dv = ops.attention_backward(np.ones_like(out), q, k, v, attn, 2)
    assert (dq[0, 0] == 0).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    q1, k1, v1 = qkv(N=1, Lq=1, Lk=1, C=4)
    out1, attn1 = ops.attention_forward(q1, k1, v1, 4)
    assert_close(out1, v1, atol=1e-6) and assert_close(attn1, np.ones((1, 4, 1, 1)))


def test_bad_input_and_no_mutation():
    q, k, v = qkv()
    check = unchanged(q, k, v)
    with pytest.raises(TypeError, match="q"):
        ops.attention_forward(q.astype(np.int32), k, v, 2)
    with pytest.raises(ValueError, match="k"):
        ops.attention_forward(q, k[:, :, :4], v, 2)
    with pytest.raises(ValueError, match="v"):
        ops.attention_forward(q, k, v[:, :3], 2)
    with pytest.raises(ValueError, match="num_heads"):
        ops.attention_forward(q, k, v, 3)
    with pytest.raises(TypeError, match="attn_mask"):
        ops.attention_forward(q, k, v, 2, attn_mask=np.zeros((5, 7)))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops.attention_forward(q, k, v, 2, key_padding_mask=np.zeros((2, 5), bool))
    _, attn = ops.attention_forward(q, k, v, 2)
    with pytest.raises(ValueError, match="attn"):
        ops.attention_backward(np.zeros((2, 5, 8), np.float32), q, k, v, attn[:, :1], 2)
    out_t, _ = ops.attention_forward(q.transpose(1, 0, 2).copy().transpose(1, 0, 2), k, v, 2)
    assert_close(out_t, ops.attention_forward(q, k, v, 2)[0], atol=0, rtol=0)
    check()


def test_memory_flat():
    q, k, v = qkv(N=1, Lq=4, Lk=4, C=4)
    am = np.zeros((4, 4), bool)

    def call():
        out, attn = ops.attention_forward(q, k, v, 2, attn_mask=am)
        ops.attention_backward(out, q, k, v, attn, 2)
    assert_memory_flat(call)


def dino_denoising_mask(num_queries, groups, group_size):
    """DINO's self-attention mask: matching queries do not see the denoising queries,
    and each denoising group sees only itself and the matching queries."""
    pad = groups * group_size
    m = np.zeros((pad + num_queries, pad + num_queries), bool)
    m[pad:, :pad] = True
    for g in range(groups):
        lo, hi = g * group_size, (g + 1) * group_size
        m[lo:hi, :lo] = True
        m[lo:hi, hi:pad] = True
    return m


def test_parity_with_scaled_dot_product_attention():
    torch = torch_or_skip()
    N, L, C, H = 2, 10, 16, 2
    q, k, v = qkv(N, L, L, C, seed=11)
    am = dino_denoising_mask(num_queries=4, groups=3, group_size=2)
    d = C // H
    th = [torch.tensor(a).reshape(N, L, H, d).transpose(1, 2) for a in (q, k, v)]
    # SDPA's boolean mask means True = may attend: the opposite of damex / nn.MultiheadAttention
    ref = torch.nn.functional.scaled_dot_product_attention(*th, attn_mask=torch.tensor(~am))
    out, _ = ops.attention_forward(q, k, v, H, attn_mask=am)
    assert_close(out, ref.transpose(1, 2).reshape(N, L, C).numpy(), atol=2e-6, rtol=1e-5)


def test_dino_mask_with_padding_against_float64_torch():
    """Values and all three gradients against float64 torch on the very float32 inputs,
    with the denoising mask, key padding and the threaded path (enough work)."""
    torch = torch_or_skip()
    am = dino_denoising_mask(num_queries=100, groups=5, group_size=12)
    L, N, C, H = am.shape[0], 2, 32, 4
    q, k, v = qkv(N, L, L, C, seed=12)
    kpm = np.zeros((N, L), bool)
    kpm[1, -7:] = True
    dout = np.random.default_rng(13).normal(size=q.shape).astype(np.float32)
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    tout, p = torch_twins.attention(tq, tk, tv, H, am, kpm)
    tout.backward(torch.tensor(dout, dtype=torch.float64))
    out, attn = ops.attention_forward(q, k, v, H, attn_mask=am, key_padding_mask=kpm)
    assert_close(out, tout.detach().numpy(), atol=1e-5, rtol=1e-4, name="out")
    assert_close(attn, p.detach().numpy(), atol=1e-6, rtol=1e-4, name="attn")
    assert (attn[:, :, 60:, :60] == 0).all()  # matching queries never see denoising ones
    for got, t, name in zip(ops.attention_backward(dout, q, k, v, attn, H), (tq, tk, tv),
                            ("dq", "dk", "dv")):
        assert_close(got, t.grad.numpy(), atol=2e-5, rtol=1e-4, name=name)


def test_fully_blocked_row_is_zero_where_torch_gives_nan():
    torch = torch_or_skip()
    q, k, v = qkv(N=1, Lq=3, Lk=4, C=4, seed=14)
    am = np.zeros((3, 4), bool)
    am[1] = True
    out, _ = ops.attention_forward(q, k, v, 2, attn_mask=am)
    ref = torch_twins.attention(*(torch.tensor(a) for a in (q, k, v)), 2, am)[0].numpy()
    assert np.isnan(ref[0, 1]).all() and (out[0, 1] == 0).all()
    assert_close(out[0, [0, 2]], ref[0, [0, 2]], atol=2e-6, rtol=1e-5)
