"""Modules: parameter names and shapes as in PyTorch, state_dict round trips through
npz bit for bit, clear errors on bad state, train/eval behaviour."""
import numpy as np
import pytest

import damex.nn as nn
from damex import ops
from damex.autograd import Tensor
from helpers import torch_or_skip



class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.bn = nn.FrozenBatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.msda = nn.MSDeformAttn(8, n_levels=2, n_heads=2, n_points=2)
        self.moe = nn.MoE(8, num_experts=4, d_hidden=16)
        self.mlp = nn.MLP(8, 16, 4, 3)
        self.blocks = nn.ModuleList([nn.LayerNorm(8), nn.Linear(8, 8, bias=False)])
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.1))
        self.emb = nn.Embedding(5, 8)


def torch_names(torch):
    tn = torch.nn
    return {
        "Linear": dict(tn.Linear(4, 3).named_parameters()),
        "LayerNorm": dict(tn.LayerNorm(4).named_parameters()),
        "GroupNorm": dict(tn.GroupNorm(2, 4).named_parameters()),
        "Conv2d": dict(tn.Conv2d(3, 4, 3).named_parameters()),
        "Embedding": dict(tn.Embedding(5, 4).named_parameters()),
        "MultiheadAttention": dict(tn.MultiheadAttention(4, 2).named_parameters()),
    }


def test_parameter_names_and_shapes_match_torch():
    torch = torch_or_skip()
    ours = {"Linear": nn.Linear(4, 3), "LayerNorm": nn.LayerNorm(4), "GroupNorm": nn.GroupNorm(2, 4),
            "Conv2d": nn.Conv2d(3, 4, 3), "Embedding": nn.Embedding(5, 4),
            "MultiheadAttention": nn.MultiheadAttention(4, 2)}
    for name, ref in torch_names(torch).items():
        got = {k: p.shape for k, p in ours[name].named_parameters()}
        want = {k: tuple(p.shape) for k, p in ref.items()}
        assert got == want, name


def test_named_parameters_and_buffers():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names[:2] == ["conv.weight", "conv.bias"]
    for n in ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
              "msda.sampling_offsets.weight", "msda.sampling_offsets.bias", "msda.attention_weights.weight",
              "msda.value_proj.weight", "msda.output_proj.bias", "moe.w_router", "moe.w1", "moe.b1",
              "moe.w2", "moe.b2", "mlp.layers.2.weight", "blocks.0.weight", "blocks.1.weight",
              "seq.0.bias", "emb.weight"]:
        assert n in names, n
    assert "blocks.1.bias" not in names
    assert dict(net.named_parameters())["moe.w1"].shape == (4, 8, 16)
    assert dict(net.named_parameters())["msda.sampling_offsets.weight"].shape == (2 * 2 * 2 * 2, 8)
    assert [n for n, _ in net.named_buffers()] == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    assert "bn.running_var" in net.state_dict()
    assert len(list(net.children())) == 10
    assert all(p.requires_grad for p in net.parameters())


def test_shared_parameter_listed_once():
    a = nn.Linear(3, 3)
    seq = nn.Sequential(a, a)
    assert len(list(seq.parameters())) == 2


def test_msdeformattn_init_is_dinos():
    m = nn.MSDeformAttn(16, n_levels=2, n_heads=4, n_points=3)
    assert not m.sampling_offsets.weight.data.any()
    assert not m.attention_weights.weight.data.any() and not m.attention_weights.bias.data.any()
    grid = m.sampling_offsets.bias.data.reshape(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y, head 2 along -x, head 3 along -y; point p at p+1
    np.testing.assert_allclose(grid[0, 1, :, 0], [1, 2, 3])
    np.testing.assert_allclose(grid[1, 0, :, 1], [1, 2, 3])
    np.testing.assert_allclose(grid[2, 0, :, 0], [-1, -2, -3])
    np.testing.assert_allclose(grid[3, 1, 2], [0, -3], atol=1e-6)
    assert not m.value_proj.bias.data.any() and not m.output_proj.bias.data.any()


def test_mha_init_like_torch():
    m = nn.MultiheadAttention(12, 3)
    bound = np.sqrt(6 / (12 + 36))
    assert np.abs(m.in_proj_weight.data).max() <= bound
    assert not m.in_proj_bias.data.any() and not m.out_proj.bias.data.any()


def test_manual_seed_reproduces_init():
    nn.manual_seed(3)
    a = Net().state_dict()
    nn.manual_seed(3)
    b = Net().state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_state_dict_round_trip_bit_exact(tmp_path):
    net = Net()
    net.bn.running_var[...] = np.linspace(0.5, 2, 8)
    path = tmp_path / "net.npz"
    nn.save(net, path)
    other = Net()
    other.load_state_dict(nn.load(path))
    sa, sb = net.state_dict(), other.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype
        assert sa[k].tobytes() == sb[k].tobytes(), k
    # the file holds no pickled objects
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(sa)


def test_load_state_dict_keeps_parameter_identity():
    net = nn.Linear(3, 2)
    w = net.weight
    net.load_state_dict({"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)})
    assert net.weight is w and (w.data == 1).all()


def test_load_state_dict_errors_name_the_key():
    net = Net()
    state = net.state_dict()
    missing = dict(state)
    del missing["attn.in_proj_bias"]
    with pytest.raises(RuntimeError, match=r"missing key\(s\).*attn\.in_proj_bias"):
        net.load_state_dict(missing)
    extra = dict(state, **{"moe.w3": np.zeros(3, np.float32)})
    with pytest.raises(RuntimeError, match=r"unexpected key\(s\).*moe\.w3"):
        net.load_state_dict(extra)
    bad = dict(state, **{"mlp.layers.1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(RuntimeError, match=r"size mismatch for mlp\.layers\.1\.weight.*\(3, 3\).*\(16, 16\)"):
        net.load_state_dict(bad)
    before = net.state_dict()
    with pytest.raises(RuntimeError):
        net.load_state_dict(bad)
    for k, v in net.state_dict().items():   # a failed load changes nothing
        np.testing.assert_array_equal(v, before[k])
    missing_ok, unexpected_ok = net.load_state_dict(extra, strict=False)
    assert unexpected_ok == ["moe.w3"] and missing_ok == []


def test_save_refuses_objects(tmp_path):
    with pytest.raises(TypeError, match="bad"):
        nn.save({"bad": np.array([object()])}, tmp_path / "x.npz")


def test_train_eval_flags_and_zero_grad():
    net = Net()
    assert net.training and net.seq[2].training
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    for p in net.parameters():
        p.grad = np.ones(p.shape, np.float32)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_dropout_train_eval():
    d = nn.Dropout(0.5, seed=1)
    x = Tensor(np.ones((64, 64), np.float32), requires_grad=True)
    y = d(x)
    kept = y.data != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(y.data[kept], 2.0)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, kept * 2.0)
    d.eval()
    assert d(x) is x
    d2, d3 = nn.Dropout(0.5, seed=7), nn.Dropout(0.5, seed=7)
    np.testing.assert_array_equal(d2(x).data, d3(x).data)    # same seed, same bits


def test_moe_gate_noise_only_in_training():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 5, 8)).astype(np.float32), requires_grad=True)
    m = nn.MoE(8, num_experts=4, d_hidden=16, gate_noise=1.0, loss="balance", seed=3)
    y, _, r = m(x)
    assert y.shape == (2, 5, 8)
    noise = r["noise"]
    assert noise.shape == (10, 4)
    assert 0.05 < noise.std() < 0.6            # sigma = 1/E = 0.25
    assert set(r["losses"]) == {"importance", "load"}
    m.eval()
    (y1, _, r1), (y2, _, r2) = m(x), m(x)
    assert r1["noise"] is None
    np.testing.assert_array_equal(y1.data, y2.data)
    assert set(r2["losses"]) == {"importance"}
    m2 = nn.MoE(8, num_experts=4, d_hidden=16, gate_noise=1.0, loss="balance", seed=3)
    m2.load_state_dict(m.state_dict())
    m2.train()
    np.testing.assert_array_equal(m2(x).routing["noise"], noise)   # same seed, same noise


def test_moe_dataset_ids_per_image_and_per_token():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((3, 4, 8)).astype(np.float32))
    m = nn.MoE(8, num_experts=4, d_hidden=16, loss="damex", dataset_to_expert=[2, 0, 1], gate_noise=0.0)
    r = m(x, dataset_ids=np.array([0, 1, 2])).routing
    np.testing.assert_array_equal(r["expert_target"], np.repeat([2, 0, 1], 4))
    per_token = np.repeat(np.array([[0], [1], [2]]), 4, axis=1)
    _, aux, r = m(x, dataset_ids=per_token)
    np.testing.assert_array_equal(r["expert_target"], np.repeat([2, 0, 1], 4))
    assert "damex" in r["losses"] and aux.shape == ()
    _, aux, r = m(x)
    assert r["losses"] == {} and float(aux) == 0.0
    with pytest.raises(ValueError, match="dataset_ids"):
        m(x, dataset_ids=np.array([0, 1]))


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_matches_torch(batch_first):
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    E_, H_, L, S_, N = 8, 2, 5, 6, 3
    m = nn.MultiheadAttention(E_, H_, batch_first=batch_first)
    for p in m.parameters():
        p.data[...] = rng.normal(0, 0.3, p.shape)
    tm = torch.nn.MultiheadAttention(E_, H_, batch_first=batch_first)
    tm.load_state_dict({k: torch.tensor(v) for k, v in m.state_dict().items()})
    shp = lambda n: (N, n, E_) if batch_first else (n, N, E_)  # noqa: E731
    q, k, v = (rng.standard_normal(shp(n)).astype(np.float32) for n in (L, S_, S_))
    am = np.zeros((L, S_), bool)
    am[1, :3] = True
    kpm = np.zeros((N, S_), bool)
    kpm[2, -1] = True
    qs, ks, vs = (Tensor(a, requires_grad=True) for a in (q, k, v))
    out, w = m(qs, ks, vs, key_padding_mask=kpm, attn_mask=am)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout, tw = tm(tq, tk, tv, key_padding_mask=torch.tensor(kpm), attn_mask=torch.tensor(am))
    np.testing.assert_allclose(out.data, tout.detach().numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(w.data, tw.detach().numpy(), atol=1e-6)
    up = rng.standard_normal(out.shape).astype(np.float32)
    (out * up).sum().backward()
    (tout * torch.tensor(up)).sum().backward()
    for a, b in ((qs, tq), (ks, tk), (vs, tv)):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), atol=1e-5, rtol=1e-4)
    tgrads = dict(tm.named_parameters())
    for name, p in m.named_parameters():
        np.testing.assert_allclose(p.grad, tgrads[name].grad.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)
    _, none = m(qs, ks, vs, need_weights=False)
    assert none is None


def test_adamw_matches_torch_and_state_round_trip(tmp_path):
    torch = torch_or_skip()
    from damex.optim import AdamW
    rng = np.random.default_rng(0)
    ps = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in [(4, 3), (5,)]]
    tps = [torch.tensor(p.data.copy(), requires_grad=True) for p in ps]
    groups = [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.05, "weight_decay": 0.0}]
    opt = AdamW(groups, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    topt = torch.optim.AdamW([{"params": [tps[0]]}, {"params": [tps[1]], "lr": 0.05, "weight_decay": 0.0}],
                             lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in ps] for _ in range(6)]
    for step in range(3):
        for p, tp, g in zip(ps, tps, grads[step]):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        opt.step()
        topt.step()
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    # save / load the optimizer state, continue both copies: identical bits
    nn.save(opt, tmp_path / "opt.npz")
    ps2 = [nn.Parameter(p.data.copy()) for p in ps]
    opt2 = AdamW([{"params": [ps2[0]]}, {"params": [ps2[1]]}], lr=1.0)
    opt2.load_state_dict(nn.load(tmp_path / "opt.npz"))
    assert opt2.param_groups[1]["lr"] == 0.05 and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    for step in range(3, 6):
        for p, p2, g in zip(ps, ps2, grads[step]):
            p.grad, p2.grad = g.copy(), g.copy()
        opt.step()
        opt2.step()
    for p, p2 in zip(ps, ps2):
        assert p.data.tobytes() == p2.data.tobytes()
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_step_lr_schedules_match_torch():
    torch = torch_or_skip()
    from damex.optim import AdamW, MultiStepLR, StepLR
    for make, tmake in [(lambda o: StepLR(o, 3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
                        (lambda o: MultiStepLR(o, [2, 5], 0.1),
                         lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.1))]:
        opt = AdamW([nn.Parameter(np.zeros(2, np.float32))], lr=0.1)
        topt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=0.1)
        s, ts = make(opt), tmake(topt)
        for _ in range(8):
            assert s.get_last_lr() == pytest.approx(ts.get_last_lr())
            topt.step()
            s.step()
            ts.step()


def test_clip_grad_norm_matches_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    ps = [nn.Parameter(np.zeros(s, np.float32)) for s in [(3, 4), (5,)]]
    tps = [torch.zeros(s, requires_grad=True) for s in [(3, 4), (5,)]]
    for p, tp in zip(ps, tps):
        g = rng.standard_normal(p.shape).astype(np.float32) * 3
        p.grad, tp.grad = g.copy(), torch.tensor(g)
    total = nn.utils.clip_grad_norm_(ps, 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_(tps, 1.0)
    assert total == pytest.approx(float(ttotal), rel=1e-5)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_assigning_a_buffer_updates_it():
    bn = nn.FrozenBatchNorm2d(3)
    bn.running_mean = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(bn.state_dict()["running_mean"], [0, 1, 2])
    lin = nn.Linear(2, 2)
    lin.extra = 5                                   # plain attributes stay plain
    assert lin.extra == 5 and "extra" not in lin.state_dict()


def test_moe_extra_losses_and_options():
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((6, 8)).astype(np.float32))
    m = nn.MoE(8, num_experts=4, d_hidden=16, k=2, loss="balance", gate_noise=0.0, switch_weight=0.3, z_weight=0.01,
               loss_options={"importance": {"variance": "unbiased"}, "switch": {"counts": "topk"}})
    _, aux, r = m(x)
    vals = r["losses"]
    assert set(vals) == {"importance", "switch", "z"}
    logits = x.data @ m.w_router.data
    assert vals["importance"] == pytest.approx(ops.importance_loss_forward(logits, variance="unbiased"))
    assert vals["switch"] == pytest.approx(ops.switch_loss_forward(logits, k=2, counts="topk"))
    want = 0.5 * vals["importance"] + 0.3 * vals["switch"] + 0.01 * vals["z"]
    assert float(aux) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="unknown losses"):
        nn.MoE(8, num_experts=4, d_hidden=16, loss_options={"bogus": {}})
