"""Property tests (hypothesis): wrong input to every damex.ops family is refused
with TypeError or ValueError (never another exception, a crash or a mutated
input); inputs of another float or int dtype are either refused or give the
float32 answer; NaN/inf either propagate or are refused."""
import numpy as np
import pytest

from property_support import ERRORS, Unchanged, st
from hypothesis import given

from damex import ops

R = np.random.default_rng(0)


def f(*shape, lo=-1.0, hi=1.0):
    return R.uniform(lo, hi, shape).astype(np.float32)


def _boxes(n):
    c, wh = R.uniform(0.2, 0.8, (n, 2)), R.uniform(0.05, 0.3, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


_SHAPES = np.array([[3, 4], [2, 2]], np.int64)
_START = np.array([0, 12], np.int64)
_W = (f(3, 4, 5), f(3, 5), f(3, 5, 4), f(3, 4))

# name -> (function, valid positional args, valid keyword args)
CASES = {
    "activation": (ops.activation_forward, [f(3, 4), "gelu"], {}),
    "activation_backward": (ops.activation_backward, [f(3, 4), f(3, 4), "relu"], {}),
    "sigmoid": (ops.sigmoid_forward, [f(5)], {}),
    "inverse_sigmoid": (ops.inverse_sigmoid_forward, [f(5, lo=0, hi=1)], {}),
    "softmax": (ops.softmax_forward, [f(2, 5)], {}),
    "dropout": (ops.dropout_forward, [f(4, 3), 0.5, 7], {}),
    "embedding": (ops.embedding_forward, [f(6, 3), np.array([0, 5, 2])], {}),
    "linear": (ops.linear_forward, [f(4, 3), f(5, 3), f(5)], {}),
    "layer_norm": (ops.layer_norm_forward, [f(4, 6), f(6), f(6)], {}),
    "group_norm": (ops.group_norm_forward, [f(2, 4, 3, 3), f(4), f(4), 2], {}),
    "frozen_bn": (ops.frozen_batch_norm_forward, [f(1, 3, 2, 2), f(3), f(3), f(3), f(3, lo=0.5)], {}),
    "conv2d": (ops.conv2d_forward, [f(1, 2, 5, 5), f(3, 2, 3, 3), f(3), (1, 2), (1, 0)], {}),
    "attention": (ops.attention_forward, [f(2, 3, 4), f(2, 5, 4), f(2, 5, 4), 2], {}),
    "msda": (ops.ms_deform_attn_forward, [f(1, 16, 2, 3), _SHAPES, _START, f(1, 4, 2, 2, 2, 2, lo=0),
                                          f(1, 4, 2, 2, 2, lo=0)], {}),
    "router": (ops.router_forward, [f(6, 4), f(4, 3)], dict(k=2, capacity_factor=1.0, bpr=True)),
    "moe": (ops.moe_forward, [f(6, 4), f(4, 3), *_W], dict(k=2)),
    "importance_loss": (ops.importance_loss_forward, [f(6, 3)], {}),
    "load_loss": (ops.load_loss_forward, [f(6, 3), f(6, 3), 0.25, 1], {}),
    "switch_loss": (ops.switch_loss_forward, [f(6, 3)], dict(k=1)),
    "z_loss": (ops.z_loss_forward, [f(6, 3)], {}),
    "damex_loss": (ops.damex_loss_forward, [f(6, 3), np.array([0, 1, 2, 0, 1, 2])], {}),
    "box_convert": (ops.box_cxcywh_to_xyxy_forward, [f(3, 4)], {}),
    "box_iou": (ops.box_iou_forward, [_boxes(3), _boxes(2)], {}),
    "giou": (ops.generalized_box_iou_forward, [_boxes(3), _boxes(2)], {}),
    "focal": (ops.sigmoid_focal_loss_forward, [f(3, 4), f(3, 4, lo=0)], {}),
    "l1": (ops.l1_loss_forward, [f(3, 4), f(3, 4)], {}),
    "grad_norm": (ops.grad_global_norm, [[f(3), f(2, 2)]], {}),
}

ARRAY_ARGS = [(name, i) for name, (_, args, _) in CASES.items()
              for i, a in enumerate(args) if isinstance(a, np.ndarray)]

BAD = {
    "python list of strings": lambda a: [["x"] * 2],
    "object array": lambda a: np.array([object()] * max(a.size, 1), dtype=object).reshape(-1),
    "complex": lambda a: a.astype(np.complex64),
    "bool": lambda a: a.astype(bool),
    "0-d": lambda a: np.asarray(a.reshape(-1)[0] if a.size else 0, a.dtype),
    "extra axis": lambda a: a[None],
    "one axis fewer": lambda a: a.reshape(-1)[: max(a.shape[-1], 1)] if a.ndim > 1 else a[:0].reshape(0, 0),
    "wrong last size": lambda a: np.concatenate([a, a[..., :1]], -1) if a.ndim else a,
    "None": lambda a: None,
    "string": lambda a: "abc",
}


def _call(name, i, value):
    fn, args, kw = CASES[name]
    args = list(args)
    args[i] = value
    return fn(*args, **kw)


def _refused_or_accepted_unchanged(name, i, value):
    """Call ``name`` with ``value`` as argument ``i``: a clean error or a result, and no
    input changed either way."""
    keep = Unchanged(*CASES[name][1], value)
    try:
        _call(name, i, value)
    except ERRORS:
        pass
    keep.check()


@pytest.mark.parametrize("case", ARRAY_ARGS, ids=[f"{n}-{i}" for n, i in ARRAY_ARGS])
@given(bad=st.sampled_from(sorted(BAD)))
def test_bad_arrays_are_refused_cleanly(case, bad):
    name, i = case
    value = BAD[bad](CASES[name][1][i])
    _refused_or_accepted_unchanged(name, i, value)


@pytest.mark.parametrize("case", ARRAY_ARGS, ids=[f"{n}-{i}" for n, i in ARRAY_ARGS])
@given(how=st.sampled_from(["float64", "float16", "int32", "strided", "reversed"]))
def test_other_dtypes_and_layouts_convert_or_refuse(case, how):
    name, i = case
    a = CASES[name][1][i]
    if how == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        value = big[..., ::2]
    elif how == "reversed":
        value = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    else:
        value = a.astype(how)
    keep = Unchanged(*CASES[name][1], value)
    want = _call(name, i, a)
    try:
        got = _call(name, i, value)
    except ERRORS:
        assert how not in ("strided", "reversed"), "a view of the same values was refused"
        return
    finally:
        keep.check()
    if np.array_equal(value, a):  # the same values: the same answer
        for g, w in zip(_arrays(got), _arrays(want)):
            np.testing.assert_array_equal(g, w)


def _arrays(result):
    """The ndarrays of an op's result (an array, a tuple, or a result object)."""
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, tuple):
        return [r for r in result if isinstance(r, np.ndarray)]
    return [v for v in vars(result).values() if isinstance(v, np.ndarray)] if hasattr(result, "__dict__") else []


@pytest.mark.parametrize("case", ARRAY_ARGS, ids=[f"{n}-{i}" for n, i in ARRAY_ARGS])
@given(v=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_non_finite_values_propagate_or_are_refused(case, v):
    name, i = case
    a = CASES[name][1][i]
    if a.dtype.kind != "f" or a.size == 0:
        return
    value = a.copy()
    value.reshape(-1)[0] = v
    _refused_or_accepted_unchanged(name, i, value)


@pytest.mark.parametrize("name,arg,bad", [
    ("activation", 1, "swish"), ("conv2d", 3, (0, 1)), ("conv2d", 4, (-1, 0)), ("conv2d", 3, 2.5),
    ("dropout", 1, 1.5), ("dropout", 1, -0.1), ("dropout", 1, np.nan),
    ("load_loss", 2, -1.0), ("load_loss", 3, 0), ("load_loss", 3, 9), ("group_norm", 3, 3),
    ("attention", 3, 3), ("attention", 3, 0), ("damex_loss", 1, np.array([0, 1, 2, 0, 1, 3]))])
def test_bad_options_are_refused(name, arg, bad):
    with pytest.raises(ERRORS):
        _call(name, arg, bad)
