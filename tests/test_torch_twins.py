"""The PyTorch twins of damex.testing.torch_twins (used by the benchmarks)
compute what damex computes: the capacity/BPR MoE layer against
ops.moe_forward, the grid_sample MSDA against the NumPy reference."""
import numpy as np
import pytest

from damex import ops
from damex.testing import reference, torch_twins
from helpers import assert_close, torch_or_skip


@pytest.mark.parametrize("k,cf,bpr", [(1, None, False), (1, 1.0, True), (2, 0.75, False),
                                      (2, 1.25, True)])
def test_moe_layer_twin_matches_damex(k, cf, bpr):
    torch = torch_or_skip()
    rng = np.random.default_rng(k)
    T, D, F, E = 40, 8, 12, 4
    x = rng.normal(size=(T, D)).astype(np.float32)
    wr = rng.normal(0, 0.5, (D, E)).astype(np.float32)
    w1, b1 = rng.normal(0, 0.3, (E, D, F)).astype(np.float32), rng.normal(0, 0.1, (E, F)).astype(np.float32)
    w2, b2 = rng.normal(0, 0.3, (E, F, D)).astype(np.float32), rng.normal(0, 0.1, (E, D)).astype(np.float32)
    y, state = ops.moe_forward(x, wr, w1, b1, w2, b2, k=k, capacity_factor=cf, bpr=bpr)
    ty = torch_twins.moe_layer(*(torch.tensor(a) for a in (x, wr, w1, b1, w2, b2)), k, cf, bpr)
    assert_close(y, ty.numpy(), atol=1e-5, rtol=1e-4)


def test_msda_twin_matches_reference():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    shapes = np.array([[4, 5], [2, 3]], np.int64)
    N, Lq, M, D, P = 2, 3, 2, 4, 2
    value = rng.normal(size=(N, 26, M, D))
    loc = rng.uniform(-0.2, 1.2, (N, Lq, M, 2, P, 2))
    attw = rng.uniform(0, 1, (N, Lq, M, 2, P))
    got = torch_twins.ms_deform_attn(torch.tensor(value),
                                     shapes, torch.tensor(loc), torch.tensor(attw))
    assert_close(got.numpy(), reference.ms_deform_attn(value, shapes, loc, attw), atol=1e-12, rtol=1e-10)
