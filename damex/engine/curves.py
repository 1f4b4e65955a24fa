"""The training-curves picture of a run: a few readable panels from ``log.jsonl``.

Panels (each drawn only when the log holds its data):

1. total loss: the raw per-step trace faint, an exponential moving average on top;
2. loss terms grouped: classification, L1 box, GIoU (each summed over the decoder
   layers, encoder and denoising parts, smoothed);
3. routing loss (smoothed);
4. dropped fraction per MoE layer;
5. validation: mean AP and AP per dataset, routing accuracy (``eval_every``);
6. learning rate.
"""
import numpy as np

from .routing_analysis import _pyplot, _save_png

GROUPS = (("classification", "loss_ce"), ("box L1", "loss_bbox"), ("GIoU", "loss_giou"))


def smooth(y, weight=None):
    """Bias-corrected exponential moving average; ``weight`` defaults to the
    window of ~5% of the points (at least 0.6, at most 0.98)."""
    y = np.asarray(y, dtype=np.float64)
    if weight is None:
        weight = min(0.98, max(0.6, 1.0 - 20.0 / max(len(y), 1)))
    out = np.empty_like(y)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(y):
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = avg / norm
    return out


def _column(history, key):
    pts = [(r["step"], r[key]) for r in history
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return (np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)) if pts else None


def _group_sum(history, prefix):
    pts = []
    for r in history:
        vals = [v for k, v in r.items() if (k == prefix or k.startswith(prefix + "_"))
                and isinstance(v, (int, float))]
        if vals:
            pts.append((r["step"], float(sum(vals))))
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else None


def panels(history):
    """``[(title, [(label, x, y, style)])]`` of the panels the log has data for."""
    out = []
    loss = _column(history, "loss")
    if loss:
        x, y = loss
        out.append(("total loss", [("raw", x, y, "faint"), ("smoothed", x, smooth(y), "main")]))
    groups = [(label, *g) for label, prefix in GROUPS if (g := _group_sum(history, prefix))]
    if groups:
        out.append(("loss terms (summed over layers, smoothed)",
                    [(label, x, smooth(y), "main") for label, x, y in groups]))
    routing = _column(history, "loss_routing")
    if routing:
        x, y = routing
        out.append(("routing loss", [("raw", x, y, "faint"), ("smoothed", x, smooth(y), "main")]))
    dropped = sorted({k for r in history for k in r if k.startswith("dropped_fraction/")})
    if dropped:
        out.append(("dropped fraction", [(k.split("/", 1)[1], *_column(history, k), "main")
                                         for k in dropped]))
    val = [r for r in history if isinstance(r.get("val"), dict)]
    if val:
        steps = np.array([r["step"] for r in val], float)
        lines = [("mean AP", steps, np.array([r["val"]["mean_ap"] if r["val"]["mean_ap"] is not None
                                              else np.nan for r in val]), "bold")]
        for name in val[0]["val"].get("ap", {}):
            lines.append((name, steps, np.array([np.nan if r["val"]["ap"].get(name) is None
                                                 else r["val"]["ap"][name] for r in val]), "main"))
        if any(r["val"].get("routing_accuracy") is not None for r in val):
            lines.append(("routing accuracy", steps,
                          np.array([np.nan if r["val"].get("routing_accuracy") is None
                                    else r["val"]["routing_accuracy"] for r in val]), "dashed"))
        out.append(("validation", lines))
    lr = _column(history, "lr")
    if lr:
        out.append(("learning rate", [("lr", *lr, "main")]))
    return out


def plot_run_curves(history, path, title=None):
    """Write the curves picture of a training history (list of log records) to ``path``."""
    plt = _pyplot()
    ps = panels(list(history))
    if not ps:
        raise ValueError("plot_run_curves: the history holds no losses")
    cols = min(3, len(ps))
    rows = -(-len(ps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    try:
        for ax, (name, lines) in zip(axes.flat, ps):
            for label, x, y, style in lines:
                kw = {"faint": dict(alpha=0.25, lw=0.8, color="tab:blue"),
                      "main": dict(lw=1.5), "bold": dict(lw=2.4, color="black"),
                      "dashed": dict(lw=1.5, ls="--", color="tab:gray")}[style]
                ax.plot(x, y, label=label, marker="o" if len(x) <= 12 else None, ms=3, **kw)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if name == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if len(lines) > 1:
                ax.legend(fontsize=7, frameon=False)
        for ax in list(axes.flat)[len(ps):]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path
