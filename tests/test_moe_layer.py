"""damex.MoELayer: gate noise, routing losses reaching the router, statistics,
PyTorch parity of the whole layer with its routing loss, and the demo."""
import math

import numpy as np
import pytest

import damex
from damex import ops
from helpers import assert_close, torch_or_skip, unchanged
from damex.testing import torch_twins


WEIGHTS = {"damex": 0.1, "importance": 0.5, "load": 0.5}


def make_layer(**kw):
    args = dict(d_model=8, d_hidden=16, num_experts=4, k=1, capacity_factor=None, bpr=True,
                loss="damex", dataset_to_expert=[0, 1, 2, 2, 3], seed=3)
    args.update(kw)
    return damex.MoELayer(args.pop("d_model"), **args)


def mixed_batch(T=24, D=8, n_datasets=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, D)).astype(np.float32), rng.integers(0, n_datasets, T)


def test_noise_only_in_training_and_replayable():
    x, ids = mixed_batch()
    a, b = make_layer(seed=7), make_layer(seed=7)
    ya, yb = a.forward(x, dataset_ids=ids), b.forward(x, dataset_ids=ids)
    np.testing.assert_array_equal(ya, yb)  # same seed, same bits
    noise = a.routing["noise"]
    assert noise is not None and noise.shape == (24, 4)
    assert abs(noise.std() - a.sigma) < 0.1  # sigma = gate_noise / E
    c = make_layer(seed=7)
    np.testing.assert_array_equal(c.forward(x, dataset_ids=ids, noise=noise), ya)  # replay
    a.eval()
    a.forward(x)
    assert a.routing["noise"] is None and a.aux_loss == 0.0


def test_statistics_on_a_mixed_batch_with_many_to_one_map():
    x, ids = mixed_batch(T=40)
    layer = make_layer().eval()
    layer.forward(x, dataset_ids=ids)
    s = layer.routing_stats()
    m = s["dataset_expert"]
    assert m.shape == (5, 4) and m.sum() == 40
    np.testing.assert_array_equal(m.sum(1), np.bincount(ids, minlength=5))
    top1 = layer.routing["expert_index"][:, 0]
    mapping = np.array([0, 1, 2, 2, 3])
    assert s["accuracy"] == pytest.approx((top1 == mapping[ids]).mean())
    assert s["dropped_fraction"] == 0.0  # dropless
    assert_close(s["expert_load"].sum(), 1.0)


def test_padding_tokens_take_no_part():
    x, ids = mixed_batch(T=16)
    mask = np.arange(16) < 12
    layer = make_layer().eval()
    y = layer.forward(x, dataset_ids=ids, mask=mask)
    assert (y[12:] == 0).all()
    assert layer.routing_stats()["dataset_expert"].sum() == 12


def _torch_layer_loss(torch, p, x, noise, expert_index, target, mode, k, sigma, weights):
    """The same layer through the twins in float64: dropless top-k MoE on the
    layer's choices (checked to be torch's top-k) plus its routing loss."""
    t = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in p.items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y, logits, noisy = torch_twins.moe_layer_on_choices(
        xt, t["w_router"], t["w1"], t["b1"], t["w2"], t["b2"], expert_index,
        torch.tensor(noise, dtype=torch.float64))
    np.testing.assert_array_equal(torch.topk(noisy.detach(), k, dim=-1).indices.numpy(), expert_index)
    if mode == "damex":
        aux = weights["damex"] * torch_twins.damex_loss(logits, target)
    else:
        aux = weights["importance"] * torch_twins.importance_loss(logits) + \
            weights["load"] * torch_twins.load_loss(logits, noise, sigma, k)
    return xt, t, y, aux


@pytest.mark.parametrize("mode,k", [("damex", 1), ("balance", 1), ("balance", 2)])
def test_layer_and_routing_loss_match_torch(mode, k):
    torch = torch_or_skip()
    x, ids = mixed_batch(T=32)
    layer = make_layer(loss=mode, k=k)
    check = unchanged(x, ids)
    y = layer.forward(x, dataset_ids=ids)
    dy = np.random.default_rng(5).normal(size=y.shape).astype(np.float32)
    layer.zero_grad()
    dx = layer.backward(dy)
    check()
    target = np.array([0, 1, 2, 2, 3])[ids]
    xt, t, yt, aux = _torch_layer_loss(torch, layer.params, x, layer.routing["noise"],
                                       layer.routing["expert_index"], target, mode, k, layer.sigma, WEIGHTS)
    ((yt * torch.tensor(dy, dtype=torch.float64)).sum() + aux).backward()
    assert_close(y, yt.detach().numpy(), atol=1e-5, rtol=1e-4, name="y")
    assert layer.aux_loss == pytest.approx(float(aux.detach()), rel=1e-4, abs=1e-6)
    assert_close(dx, xt.grad.numpy(), atol=1e-5, rtol=1e-3, name="dx")
    for name in ("w_router", "w1", "b1", "w2", "b2"):
        assert_close(layer.grads[name], t[name].grad.numpy(), atol=1e-5, rtol=1e-3, name=name)


def test_seed_balance_weights_reachable():
    layer = make_layer(loss="balance", importance_weight=1.0, load_weight=0.5)
    x, ids = mixed_batch()
    layer.forward(x, dataset_ids=ids)
    t = layer.loss_terms
    assert layer.aux_loss == pytest.approx(t["importance"] + 0.5 * t["load"], rel=1e-6)


def test_bad_configuration():
    with pytest.raises(ValueError, match="dataset_to_expert"):
        make_layer(dataset_to_expert=[0, 9])
    with pytest.raises(ValueError, match="dataset_to_expert"):
        make_layer(dataset_to_expert=None)
    with pytest.raises(ValueError, match="k"):
        make_layer(k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        make_layer(capacity_factor=0)
    with pytest.raises(ValueError, match="loss"):
        make_layer(loss="aux")
    layer = make_layer()
    x, _ = mixed_batch()
    with pytest.raises(ValueError, match="dataset_ids"):
        layer.forward(x)
    with pytest.raises(ValueError, match="dataset_ids"):
        layer.forward(x, dataset_ids=np.full(24, 7))
    with pytest.raises(RuntimeError, match="forward"):
        make_layer().backward(np.zeros((24, 8), np.float32))


def test_demo_learns_dataset_routing():
    from damex.engine.moe_demo import run_demo

    res = run_demo(mode="damex", steps=120, log_every=0)
    assert res["accuracy"] > 0.9
    assert math.isfinite(res["mse"]) and res["history"][-1][0] < res["history"][0][0]
