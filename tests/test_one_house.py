"""One home per concept (issue 11): one MoE layer API, one map h, one set of routing
statistics, and the per-forward context whose random streams make exact resume hold
for any random module, whatever its name."""
import inspect

import numpy as np
import pytest

import damex
from damex import nn, routing
from damex.autograd import Tensor
from damex.engine.train import Trainer
from damex.nn.context import ForwardContext

from damex.engine.checkpoint import load_checkpoint
from damex.engine.config import run_config_from_dict
from test_dino import SMALL, run_cfg


def test_positional_order_trap_is_refused():
    with pytest.raises(TypeError):
        nn.MoE(256, 1024, 8)
    with pytest.raises(TypeError):
        damex.MoELayer(256, 1024, 8)
    m = nn.MoE(16, d_hidden=32, num_experts=4)
    assert (m.d_hidden, m.num_experts) == (32, 4)


def test_moe_layer_and_module_share_names_order_and_defaults():
    sig = inspect.signature(nn.MoE.__init__)
    params = [p for n, p in sig.parameters.items() if n != "self"]
    assert params[0].name == "d_model" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    layer = damex.MoELayer(16, d_hidden=32, num_experts=4, dataset_to_expert=[0, 1])
    m = layer.module
    assert m.capacity_factor == 1.25 and m.eval_capacity_factor is None
    assert m.damex_weight == routing.DAMEX_WEIGHT == 0.1
    assert sig.parameters["damex_weight"].default == routing.DAMEX_WEIGHT
    from damex.models.criterion import SetCriterion
    from damex.engine.config import TrainConfig
    assert SetCriterion(3).routing_weight == TrainConfig().routing_weight == routing.DAMEX_WEIGHT


def test_expert_map_defaults_and_validates_in_one_place():
    assert routing.expert_map(None, 4, 6).tolist() == [0, 1, 2, 3, 0, 1]
    assert routing.expert_map([0, 0, 1], 2, 3).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="expert ids must lie in"):
        routing.expert_map([0, 5], 4)
    with pytest.raises(ValueError, match="expected 3 entries"):
        routing.expert_map([0, 1], 4, 3)
    with pytest.raises(ValueError, match="expert ids must lie in"):
        nn.MoE(8, d_hidden=8, num_experts=2, dataset_to_expert=[0, 2])


def test_routing_modes_name_the_layer_losses():
    assert routing.mode_loss("dense") is None
    assert routing.mode_loss("moe") == "balance" and routing.mode_loss("damex") == "damex"
    assert all(routing.mode_loss(m) in routing.LOSSES + (None,) for m in routing.MODES)
    with pytest.raises(ValueError, match="routing"):
        routing.mode_loss("balanced")


def test_purity_is_permutation_invariant():
    counts = np.array([[0, 10, 0], [0, 0, 7], [5, 0, 0]])
    assert routing.routing_purity(counts) == 1.0
    assert routing.routing_accuracy([0, 1, 2], [1, 2, 0], [0, 1, 2])[0] == 0.0
    # more datasets than experts: the unmatched dataset counts as misses
    assert routing.routing_purity(np.array([[4, 0], [0, 4], [0, 2]])) == pytest.approx(0.8)


def test_eval_is_dropless_by_default_and_capacity_is_an_option():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((64, 8)).astype(np.float32))
    m = nn.MoE(8, d_hidden=16, num_experts=4, capacity_factor=0.5, gate_noise=0.0, loss="none")
    assert m(x).routing["dropped_fraction"] > 0.4               # training: capacity drops
    m.eval()
    y, _, r = m(x)
    assert r["dropped_fraction"] == 0.0 and r["kept"] == r["routed"] == 64
    m.eval_capacity_factor = 0.5                                 # the reference behaviour
    assert m(x).routing["dropped_fraction"] > 0.4
    # dropless eval output does not depend on how tokens are grouped into calls
    m.eval_capacity_factor = None
    y2 = np.concatenate([m(Tensor(x.data[:20])).y.data, m(Tensor(x.data[20:])).y.data])
    np.testing.assert_allclose(y.data, y2, rtol=1e-6, atol=1e-6)


def test_a_module_called_twice_reports_twice():
    m = nn.MoE(8, d_hidden=16, num_experts=2, gate_noise=0.0, loss="balance")
    ctx = ForwardContext()
    for part in np.split(np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32), 2):
        _, aux, r = m(Tensor(part), ctx)
        ctx.add_routing("moe", aux, r)
    assert len(ctx.losses) == 2 and ctx.losses[0][1] is not ctx.losses[1][1]


def test_context_streams_depend_on_seed_step_and_path_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    net = Net()
    draw = lambda ctx, mod: ctx.rng(mod).random(4)  # noqa: E731
    c1, c2 = ForwardContext(seed=3, step=7, root=net), ForwardContext(seed=3, step=7, root=net)
    np.testing.assert_array_equal(draw(c1, net.a), draw(c2, net.a))
    assert not np.array_equal(draw(c1, net.a), draw(c1, net.b))
    assert not np.array_equal(draw(c1, net.a), draw(ForwardContext(seed=3, step=8, root=net), net.a))
    np.testing.assert_array_equal(draw(c1, net.a), ForwardContext(seed=3, step=7).rng("a").random(4))
    with pytest.raises(ValueError, match="not a module of the root"):
        c1.rng(nn.Linear(2, 2))


class Jitter(nn.Module):
    """A random module the library has never heard of, under a new name."""

    def forward(self, x, ctx=None, token_mask=None):
        noise = ctx.rng(self).normal(0.0, 1e-2, x.shape).astype(np.float32)
        return x + Tensor(noise)


class Chain(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.ffn, self.surprise_noise = ffn, Jitter()

    def forward(self, x, ctx=None, token_mask=None):
        return self.surprise_noise(self.ffn(x, ctx, token_mask), ctx, token_mask)


def _with_jitter(trainer):
    for layer in trainer.model.encoder.layers:
        layer.ffn = Chain(layer.ffn)
    return trainer


def test_exact_resume_holds_for_a_new_random_module(tmp_path):
    d = run_cfg(tmp_path, steps=5).to_dict()
    d["model"]["drop_path"] = 0.2
    tr = _with_jitter(Trainer(run_config_from_dict(d)))
    for _ in range(3):
        tr.train_step()
    path = tr.save(str(tmp_path / "ckpt.npz"))
    again = _with_jitter(Trainer(run_config_from_dict(d)))   # a fresh process, as a resume
    parts, meta = load_checkpoint(path)
    again.model.load_state_dict(parts["model"])
    again.optimizer.load_state_dict(parts["optim"])
    again.scheduler.load_state_dict(parts["sched"])
    again.step = int(meta["step"])
    a = [tr.train_step()["loss"] for _ in range(2)]
    b = [again.train_step()["loss"] for _ in range(2)]
    assert a == b
    for (_, p1), (_, p2) in zip(tr.model.named_parameters(), again.model.named_parameters()):
        np.testing.assert_array_equal(p1.data, p2.data)
    # and the new module's noise really changes the run
    plain = Trainer(run_cfg(tmp_path, steps=5))
    assert [plain.train_step()["loss"] for _ in range(3)] != [r["loss"] for r in tr.history[:3]]


def test_composition_capacity_gives_a_repeated_dataset_room():
    # 3 of 4 images from dataset 0: an even capacity share starves its expert
    rng = np.random.default_rng(0)
    T_img, D, E = 16, 8, 4
    x = Tensor(rng.standard_normal((4, T_img, D)).astype(np.float32))
    ids = np.array([0, 0, 0, 1])
    kw = dict(d_hidden=16, num_experts=E, capacity_factor=1.25, gate_noise=0.0, loss="damex",
              dataset_to_expert=[0, 1])
    uniform = nn.MoE(D, **kw)
    comp = nn.MoE(D, capacity_sizing="composition", **kw)
    comp.load_state_dict(uniform.state_dict())
    # route every token to its dataset's expert, as a trained DAMEX router does
    xd = x.data.copy()
    xd[:3, :, 0] += 10.0                       # dataset 0's tokens carry feature 0
    xd[3, :, 1] += 10.0                        # dataset 1's feature 1
    w = np.zeros((D, E), np.float32)
    w[0, 0] = w[1, 1] = 1.0
    for m in (uniform, comp):
        m.w_router.data[...] = w
    tokens = Tensor(xd)
    r_u = uniform(tokens, dataset_ids=ids).routing
    r_c = comp(tokens, dataset_ids=ids).routing
    assert r_u["capacity"] == int(np.ceil(1.25 * 64 / E)) == 20
    assert r_c["capacity"] == int(np.ceil(1.25 * 48)) == 60          # 48 tokens target expert 0
    assert r_u["kept"] == 20 + 16                                     # 28 of expert 0's dropped
    assert r_c["kept"] == r_c["routed"] == 64                         # nothing dropped
    # eval and routing without targets keep the uniform (or dropless) rule
    comp.eval()
    assert comp(tokens, dataset_ids=ids).routing["capacity"] == -1
    comp.train()
    assert comp(tokens).routing["capacity"] == 20
    with pytest.raises(ValueError, match="capacity_sizing"):
        nn.MoE(D, capacity_sizing="per-batch", **kw)


def test_drop_path_draws_per_image_whatever_the_batch_split():
    # data parallelism runs a rank's slice of the batch: the same image must lose the same branch
    from damex.models.transformer import MoEBlock
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 8)).astype(np.float32)
    ids = np.array([0, 1, 0, 1, 0, 1])
    block = MoEBlock(8, "ffn", drop_path=0.5, d_hidden=16, num_experts=2, gate_noise=0.0,
                     capacity_factor=None, loss="damex", dataset_to_expert=[0, 1])
    whole = block(Tensor(x), ForwardContext(ids, seed=3, step=7, root=block)).data
    parts = [block(Tensor(x[lo:hi]), ForwardContext(ids[lo:hi], seed=3, step=7, root=block,
                                                    first_image=lo)).data
             for lo, hi in ((0, 2), (2, 6))]
    np.testing.assert_allclose(whole, np.concatenate(parts), rtol=1e-6, atol=1e-6)
    dropped = [np.allclose(whole[b], x[b]) for b in range(6)]
    assert 0 < sum(dropped) < 6             # some branches dropped, some kept
