"""A small network assembled from damex.nn (conv -> tokens -> MultiheadAttention ->
MSDeformAttn -> MoE -> linear head, with a loss) against the same network written in
PyTorch with the same weights: same loss, same gradient for every parameter.
Then a small model trained with AdamW overfits a fixed batch."""
import numpy as np

import damex.nn as nn
import damex.functional as F
from damex.autograd import Tensor, cat
from helpers import assert_close, torch_or_skip
from damex.testing import torch_twins

torch = torch_or_skip()
from damex.testing.dino_twin import MSDeformAttn  # noqa: E402 (imports torch)
tnn, tF = torch.nn, torch.nn.functional


C, H, E, FH = 16, 2, 4, 24
SHAPES = np.array([[4, 4], [2, 2]], np.int64)
STARTS = np.array([0, 16], np.int64)
S = 20


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, C)
        self.conv2 = nn.Conv2d(C, C, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(C, H)
        self.msda = nn.MSDeformAttn(C, n_levels=2, n_heads=H, n_points=2)
        self.norm = nn.LayerNorm(C)
        self.moe = nn.MoE(C, num_experts=E, d_hidden=FH, k=2, capacity_factor=None, gate_noise=1.0, activation="gelu",
                          loss="damex", damex_weight=1.0, dataset_to_expert=[1, 3], seed=5)
        self.head = nn.Linear(C, 4)

    def forward(self, x, ref, kpm, dataset_ids):
        f1 = F.relu(self.gn(self.conv1(x)))
        f2 = F.relu(self.conv2(f1))
        tokens = cat([f1.flatten(2).transpose(1, 2), f2.flatten(2).transpose(1, 2)], 1)
        t = tokens.transpose(0, 1)                               # [S, N, C], torch's default layout
        a, _ = self.attn(t, t, t, key_padding_mask=kpm)
        tokens = tokens + a.transpose(0, 1)
        tokens = tokens + self.msda(tokens, ref, tokens, SHAPES, STARTS, kpm)
        tokens = self.norm(tokens)
        y, self.aux, self.routing = self.moe(tokens, dataset_ids=dataset_ids, mask=~kpm)
        return self.head(tokens + y)


class TorchMoE(tnn.Module):
    """nn.MoE's parameters (same names) around the twin of the layer given its choices."""

    def __init__(self):
        super().__init__()
        self.w_router = tnn.Parameter(torch.zeros(C, E))
        self.w1, self.b1 = tnn.Parameter(torch.zeros(E, C, FH)), tnn.Parameter(torch.zeros(E, FH))
        self.w2, self.b2 = tnn.Parameter(torch.zeros(E, FH, C)), tnn.Parameter(torch.zeros(E, C))

    def forward(self, x, noise, expert_index, target, mask):
        """Dropless top-k with the given (tie-free) choices; returns y and the DAMEX loss."""
        y, logits, noisy = torch_twins.moe_layer_on_choices(
            x, self.w_router, self.w1, self.b1, self.w2, self.b2, expert_index, noise, act="gelu",
            kept=mask[:, None])
        chosen = noisy.detach().topk(expert_index.shape[1], -1).indices.numpy()
        assert (chosen[mask] == expert_index[mask]).all(), "routing differs from torch's top-k"
        return y, torch_twins.damex_loss(logits, target, mask)


class TorchNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, C, 3, stride=2, padding=1)
        self.gn = tnn.GroupNorm(4, C)
        self.conv2 = tnn.Conv2d(C, C, 3, stride=2, padding=1)
        self.attn = tnn.MultiheadAttention(C, H)
        self.msda = MSDeformAttn(C, 2, H, 2)
        self.norm = tnn.LayerNorm(C)
        self.moe = TorchMoE()
        self.head = tnn.Linear(C, 4)

    def forward(self, x, ref, kpm, noise, expert_index, target):
        N = x.shape[0]
        f1 = tF.relu(self.gn(self.conv1(x)))
        f2 = tF.relu(self.conv2(f1))
        tokens = torch.cat([f1.flatten(2).transpose(1, 2), f2.flatten(2).transpose(1, 2)], 1)
        t = tokens.transpose(0, 1)
        a, _ = self.attn(t, t, t, key_padding_mask=torch.tensor(kpm))
        tokens = tokens + a.transpose(0, 1)
        tokens = tokens + self.msda(tokens, ref, tokens, SHAPES, torch.tensor(kpm))
        tokens = self.norm(tokens)
        y, aux = self.moe(tokens.reshape(-1, C), noise, expert_index, target, ~kpm.reshape(-1))
        tokens = tokens + y.reshape(N, S, C)
        return self.head(tokens), aux


def reference_points(N):
    pts = []
    for h, w in SHAPES:
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        pts.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = np.concatenate(pts, 0).astype(np.float32)                  # [S, 2]
    return np.broadcast_to(ref[None, :, None, :], (N, S, 2, 2)).copy()


def test_composed_network_matches_torch():
    nn.manual_seed(0)
    net = Net()
    rng = np.random.default_rng(0)
    # give every parameter a non-trivial value (DINO's init zeroes some of them)
    for name, p in net.named_parameters():
        p.data[...] += rng.normal(0, 0.1 if "sampling_offsets" not in name else 0.5, p.shape)
    N = 2
    x = rng.standard_normal((N, 3, 8, 8)).astype(np.float32)
    ref = reference_points(N)
    kpm = np.zeros((N, S), bool)
    kpm[1, -3:] = True                                              # padded tokens in image 1
    target = rng.standard_normal((N, S, 4)).astype(np.float32)
    valid = (~kpm)[..., None].astype(np.float32)
    dataset_ids = np.array([0, 1])

    out = net(x, ref, kpm, dataset_ids)
    task = ((out - target) ** 2 * valid).mean()
    loss = task + net.aux * 0.1
    loss.backward()

    tnet = TorchNet()
    tnet.load_state_dict({k: torch.tensor(v) for k, v in net.state_dict().items()}, strict=True)
    r = net.routing
    tout, taux = tnet(torch.tensor(x), torch.tensor(ref), kpm, r["noise"], r["expert_index"], r["expert_target"])
    ttask = ((tout - torch.tensor(target)) ** 2 * torch.tensor(valid)).mean()
    tloss = ttask + taux * 0.1
    tloss.backward()

    print(f"loss damex {float(loss):.7f} torch {tloss.item():.7f}")
    assert_close(out.data, tout.detach().numpy(), 1e-5, 1e-4, "network output")
    assert_close(net.aux.data, taux.detach().numpy(), 1e-6, 1e-5, "aux loss")
    assert_close(loss.data, tloss.detach().numpy(), 1e-6, 1e-5, "loss")
    tgrads = {n: p.grad for n, p in tnet.named_parameters()}
    ours = dict(net.named_parameters())
    assert set(tgrads) == set(ours)
    worst = 0.0
    for name, p in ours.items():
        tg = tgrads[name].numpy()
        g = p.grad if p.grad is not None else np.zeros_like(tg)
        worst = max(worst, float(np.abs(g - tg).max() / (np.abs(tg).max() + 1e-12)))
        assert_close(g, tg, 1e-5, 1e-3, f"grad of {name}")
    print(f"worst relative gradient error {worst:.2e} over {len(ours)} parameters")


def test_adamw_overfits_a_fixed_batch():
    from damex.optim import AdamW
    nn.manual_seed(1)
    rng = np.random.default_rng(1)
    T, D = 48, 16
    x = Tensor(rng.standard_normal((T, D)).astype(np.float32))
    y = rng.standard_normal((T, 4)).astype(np.float32)
    ids = rng.integers(0, 2, T)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(D, 32)
            self.norm = nn.LayerNorm(32)
            self.moe = nn.MoE(32, num_experts=4, d_hidden=64, k=1, capacity_factor=None, gate_noise=0.0, loss="damex",
                            damex_weight=1.0)
            self.out = nn.MLP(32, 32, 4, 2)

        def forward(self, x, ids):
            h = F.gelu(self.inp(x))
            y, self.aux, _ = self.moe(self.norm(h), dataset_ids=ids)
            return self.out(h + y)

    model = Small()
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for _ in range(300):
        pred = model(x, ids)
        loss = ((pred - y) ** 2).mean()
        opt.zero_grad()
        (loss + 0.01 * model.aux).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss))
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.6f} ({losses[0] / losses[-1]:.0f}x) in 300 steps")
    assert losses[-1] < losses[0] / 100
