"""Run by tests/test_mpi_experts.py under ``mpiexec -n N``: one expert-parallel MoE layer
against the same layer in one process (every rank computes the reference on the whole
batch), for the routing options given on the command line.  Prints ``ok RANK`` or raises."""
import json
import sys

import numpy as np

from damex import nn
from damex.autograd import Tensor
from damex.engine.distributed import World
from damex.engine.expert_parallel import ExpertParallel


def main(opts):
    world = World()
    T, D, E = opts.pop("T", 24), 8, opts.pop("E", 4)
    group = opts.pop("group", None)
    masked = opts.pop("masked", False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D)).astype(np.float32)
    mask = rng.random(T) > 0.25 if masked else None
    dy = rng.normal(size=(T, D)).astype(np.float32)
    target = rng.integers(0, E, T)
    noise = rng.normal(0, 1.0 / E, (T, E)).astype(np.float32)
    ref = nn.MoE(D, d_hidden=16, num_experts=E, seed=1, **opts)
    nn.manual_seed(3)
    ref.reset_parameters(np.random.default_rng(3))
    lay = nn.MoE(D, d_hidden=16, num_experts=E, seed=1, **opts)
    lay.load_state_dict(ref.state_dict())
    share = 1.0 / world.size
    per = T // world.size
    lo, hi = world.rank * per, (world.rank + 1) * per

    xt = Tensor(x, requires_grad=True)
    y, aux, r = ref(xt, expert_target=target, noise=noise, mask=mask)
    ((y * Tensor(dy)).sum() + aux * 0.7).backward()

    ep = ExpertParallel(world, group)
    ep.shard(lay)
    ep.loss_share = share
    xl = Tensor(x[lo:hi], requires_grad=True)
    yl, auxl, rl = lay(xl, expert_target=target[lo:hi], noise=noise[lo:hi],
                       mask=None if mask is None else mask[lo:hi])
    # as the data-parallel criterion: this rank's share of the routing loss
    ((yl * Tensor(dy[lo:hi])).sum() + auxl * (0.7 * share)).backward()

    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yl.data, y.data[lo:hi], **tol)
    np.testing.assert_allclose(float(auxl.data), float(aux.data), **tol)
    np.testing.assert_array_equal(rl["expert_index"], r["expert_index"][lo:hi])
    np.testing.assert_allclose(rl["combine_weight"], r["combine_weight"][lo:hi], **tol)
    np.testing.assert_allclose(xl.grad, xt.grad[lo:hi], **tol)
    a, b = ep.expert_range(E)
    experts = [getattr(lay, name) for name in ("w1", "b1", "w2", "b2")]
    ep.reduce_expert_gradients(experts)   # with several groups: sum over the replicas
    for name, p in zip(("w1", "b1", "w2", "b2"), experts):
        np.testing.assert_allclose(p.grad, getattr(ref, name).grad[a:b], **tol, err_msg=name)
    dwr = np.ascontiguousarray(lay.w_router.grad)
    world.allreduce_(dwr)
    np.testing.assert_allclose(dwr, ref.w_router.grad, **tol)
    assert rl["kept"] <= rl["routed"]
    kept = world.allreduce_(np.array([rl["kept"]], np.float64))[0]
    assert kept == r["kept"], (kept, r["kept"])
    print("ok", world.rank, flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
