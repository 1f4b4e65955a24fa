"""The MoE demo: a DAMEX-routed MoE layer learns a mixture of token datasets.

Each of ``num_datasets`` generated datasets has its own input domain (a
shifted, rescaled Gaussian) and its own target function (a random teacher
``tanh(x A_d) B_d``).  One MoE layer is trained with AdamW on batches that
mix the datasets, with the DAMEX loss (or the V-MoE balance loss as the
baseline).  At the end the router runs in eval mode *without* dataset labels,
and the demo reports the dataset x expert routing matrix and the routing
accuracy: with DAMEX each dataset's tokens find their own expert.
"""
import time

import numpy as np

from ..moe_layer import MoELayer
from ..optim import AdamW
from ..routing import expert_map


def make_domains(num_datasets, d_model, seed=0):
    """Per-dataset (shift, scale, A, B): the input domain and the teacher of each dataset."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 1.0, d_model), rng.uniform(0.5, 1.5),
             rng.normal(0, 1 / np.sqrt(d_model), (d_model, d_model)),
             rng.normal(0, 1 / np.sqrt(d_model), (d_model, d_model))) for _ in range(num_datasets)]


def sample_tokens(domains, tokens_per_dataset, rng):
    """Tokens x [N, D], targets y [N, D] and dataset ids [N] drawn from every domain."""
    xs, ys, ids = [], [], []
    for d, (shift, scale, a, b) in enumerate(domains):
        x = shift + scale * rng.normal(size=(tokens_per_dataset, len(shift)))
        xs.append(x)
        ys.append(np.tanh(x @ a) @ b)
        ids.append(np.full(tokens_per_dataset, d))
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32),
            np.concatenate(ids).astype(np.int64))


def run_demo(*, mode="damex", steps=300, batch=512, num_datasets=4, num_experts=4, d_model=32,
             d_hidden=64, lr=3e-3, seed=0, log_every=50, out=None):
    """Train one MoE layer on a generated mixture; return the final statistics.

    Returns
    -------
    dict with ``mse`` (held-out, eval mode), ``accuracy`` (routing accuracy without
    labels), ``purity`` (the same, up to a permutation of the experts: a balance-loss
    MoE that learns its own dataset -> expert map scores 1 here and 0 in accuracy),
    ``dataset_expert`` ([datasets, E] token fractions) and ``history``.
    """
    from tqdm import tqdm

    out = out or tqdm.write   # log lines above the progress bar

    domains = make_domains(num_datasets, d_model, seed)
    rng = np.random.default_rng(seed + 1)
    x, y, ids = sample_tokens(domains, 2048, rng)
    xt, yt, idt = sample_tokens(domains, 256, rng)  # held out: same domains, new draws
    mapping = expert_map(None, num_experts, num_datasets)
    layer = MoELayer(d_model, d_hidden=d_hidden, num_experts=num_experts, k=1, capacity_factor=1.25,
                     bpr=True, loss="damex" if mode == "damex" else "balance",
                     dataset_to_expert=mapping, seed=seed)
    opt = AdamW(layer.module.parameters(), lr=lr, weight_decay=0.0)
    history = []
    t0 = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=f"demo [{mode}]", leave=False):
        sel = rng.choice(len(x), batch, replace=False)
        pred = layer.forward(x[sel], dataset_ids=ids[sel])
        diff = pred - y[sel]
        mse = float((diff ** 2).mean())
        layer.zero_grad()
        layer.backward(2.0 * diff / diff.size)
        opt.step()
        history.append((mse, layer.aux_loss))
        if log_every and step % log_every == 0:
            out(f"step {step:4d}  mse {mse:.4f}  routing loss {layer.aux_loss:.4f}")
    layer.eval()
    pred = layer.forward(xt, dataset_ids=idt)  # ids only feed the statistics, not the router
    stats = layer.routing_stats(num_datasets)
    m = stats["dataset_expert"]
    return {"mse": float(((pred - yt) ** 2).mean()), "accuracy": stats["accuracy"],
            "purity": stats["purity"],
            "dataset_expert": m / np.maximum(m.sum(1, keepdims=True), 1), "history": history,
            "seconds": time.perf_counter() - t0}


def format_matrix(frac, row_name="dataset"):
    """The dataset x expert matrix of token fractions as text."""
    E = frac.shape[1]
    lines = [f"{row_name:>8} " + " ".join(f"{'e' + str(e):>6}" for e in range(E))]
    for d, row in enumerate(frac):
        lines.append(f"{d:>8} " + " ".join(f"{v:6.2f}" for v in row))
    return "\n".join(lines)
