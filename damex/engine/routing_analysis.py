"""Routing analysis of MoE layers, and the figures of a run (numpy + matplotlib Agg).

A *record* of one MoE layer is the pair ``(dataset_ids [T], experts [T] or
[T, k])``: for every routed token, the dataset its image came from and the
expert(s) the router chose (column 0 = top choice). From records:

* :func:`routing_matrix` - ``[D, E]`` fraction of dataset d's tokens sent to
  expert e (rows sum to 1; a top-k token counts 1/k for each of its experts);
* :func:`routing_accuracy` - share of dataset d's tokens whose top choice is
  ``h(d)`` (DAMEX's dataset -> expert assignment, default ``d mod E``);
* :func:`expert_load` - share of all routed assignments per expert;
* :func:`analyse_routing` - all three for every layer, JSON-ready.

Figures: :func:`plot_routing_heatmap`, :func:`plot_training_curves`,
:func:`draw_detections`, each writing a PNG.
"""
import os
import tempfile

import numpy as np


def _check_record(dataset_ids, experts):
    d = np.asarray(dataset_ids).reshape(-1).astype(np.int64)
    e = np.asarray(experts).astype(np.int64)
    if e.ndim == 1:
        e = e[:, None]
    if e.ndim != 2 or e.shape[0] != d.shape[0]:
        raise ValueError(f"experts must be [T] or [T, k] with T = len(dataset_ids) = {d.shape[0]}, "
                         f"got shape {np.shape(experts)}")
    return d, e


def routing_matrix(dataset_ids, experts, num_datasets, num_experts):
    """float64 ``[D, E]``: fraction of each dataset's token assignments per expert.

    A dataset without tokens has a zero row.
    """
    d, e = _check_record(dataset_ids, experts)
    if d.size and (d.min() < 0 or d.max() >= num_datasets):
        raise ValueError(f"dataset ids must lie in [0, {num_datasets}), got range [{d.min()}, {d.max()}]")
    if e.size and (e.min() < 0 or e.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{e.min()}, {e.max()}]")
    counts = np.zeros((num_datasets, num_experts), dtype=np.float64)
    np.add.at(counts, (np.repeat(d, e.shape[1]), e.reshape(-1)), 1.0)
    rows = counts.sum(1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def default_assignment(num_datasets, num_experts):
    """DAMEX's h: dataset d -> expert ``d mod E``."""
    return np.arange(num_datasets, dtype=np.int64) % num_experts


def routing_accuracy(dataset_ids, experts, assignment):
    """``(overall, per_dataset [D])``: share of tokens whose top expert is ``assignment[d]``.

    ``per_dataset`` is NaN for a dataset without tokens.
    """
    d, e = _check_record(dataset_ids, experts)
    h = np.asarray(assignment, dtype=np.int64)
    if d.size == 0:
        return float("nan"), np.full(len(h), np.nan)
    hit = e[:, 0] == h[d]
    per = np.array([hit[d == k].mean() if np.any(d == k) else np.nan for k in range(len(h))])
    return float(hit.mean()), per


def expert_load(experts, num_experts):
    """float64 ``[E]``: share of all routed assignments that went to each expert."""
    e = np.asarray(experts, dtype=np.int64).reshape(-1)
    counts = np.bincount(e, minlength=num_experts).astype(np.float64)[:num_experts]
    return counts / counts.sum() if counts.sum() else counts


def analyse_routing(records, num_datasets, num_experts, assignment=None):
    """Routing statistics of every MoE layer.

    Parameters
    ----------
    records : dict or sequence
        ``{layer_name: (dataset_ids [T], experts [T] or [T, k])}``, or a list
        of such pairs (named ``layer0``, ``layer1``, ...). Several pairs of one
        layer can be given as lists to be concatenated.
    assignment : array [D], optional
        h(d); defaults to :func:`default_assignment`.

    Returns
    -------
    dict
        ``{layer: {"matrix": [[...]], "accuracy": float, "per_dataset_accuracy":
        [...], "load": [...]}}`` with plain lists (NaN where a dataset has no tokens).
    """
    if not isinstance(records, dict):
        records = {f"layer{i}": r for i, r in enumerate(records)}
    h = default_assignment(num_datasets, num_experts) if assignment is None else np.asarray(assignment)
    out = {}
    for layer, (ds, ex) in records.items():
        if isinstance(ds, (list, tuple)) and len(ds) and np.ndim(ds[0]) >= 1:  # several batches
            parts = [np.ravel(x) for x in ds]
            ex = np.concatenate([np.asarray(x).reshape(len(p), -1) for x, p in zip(ex, parts)])
            ds = np.concatenate(parts)
        m = routing_matrix(ds, ex, num_datasets, num_experts)
        acc, per = routing_accuracy(ds, ex, h)
        out[layer] = {"matrix": m.tolist(), "accuracy": acc, "per_dataset_accuracy": per.tolist(),
                      "load": expert_load(ex, num_experts).tolist()}
    return out


def _save_png(fig, path):
    """Save ``fig`` as PNG atomically: a temporary file in the same folder, renamed into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_routing_heatmap(matrix, dataset_names, path, expert_names=None, title=None):
    """Write a PNG heatmap of a ``[D, E]`` routing matrix (cells annotated in percent)."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    D, E = m.shape
    if len(dataset_names) != D:
        raise ValueError(f"{len(dataset_names)} dataset names for a matrix with {D} rows")
    expert_names = expert_names or [f"E{e}" for e in range(E)]
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * E, 1.3 + 0.5 * D), dpi=120)
    try:
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(E), expert_names)
        ax.set_yticks(range(D), dataset_names)
        ax.set_xlabel("expert")
        ax.set_ylabel("dataset")
        ax.set_title(title or "routing: share of each dataset's tokens per expert", fontsize=9)
        for i in range(D):
            for j in range(E):
                ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 else "white")
        cb = fig.colorbar(im, ax=ax)
        cb.set_label("fraction of tokens")
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path


def _series(history):
    """``({name: (x, y)}, x label)`` from ``{name: [y...]}`` or a list of per-step dicts."""
    if isinstance(history, dict):
        return {k: (np.arange(len(v)), np.asarray(v, dtype=np.float64)) for k, v in history.items()}, None
    rows = list(history)
    xkey = next((k for k in ("step", "iteration", "epoch") if rows and all(k in r for r in rows)), None)
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        if key == xkey:
            continue
        pts = [(r[xkey] if xkey else i, r[key]) for i, r in enumerate(rows)
               if key in r and isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        if pts:
            x, y = zip(*pts)
            out[key] = (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return out, xkey


def plot_training_curves(history, path, title=None):
    """Write a PNG with one panel per metric of a training history.

    ``history`` is ``{metric: [values]}`` or a list of dicts (one per step or
    epoch; a ``step``/``iteration``/``epoch`` key, if in every row, is the x axis).
    """
    plt = _pyplot()
    series, xkey = _series(history)
    if not series:
        raise ValueError("plot_training_curves: the history holds no numeric series")
    n = len(series)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), dpi=110, squeeze=False)
    try:
        for ax, (name, (x, y)) in zip(axes.flat, series.items()):
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, ms=3, lw=1.4)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xkey or "step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path


def draw_detections(image, boxes, labels, scores, names, path, score_threshold=0.0,
                    gt_boxes=None, title=None):
    """Write a PNG of an image with its detections (and optionally ground truth).

    Parameters
    ----------
    image : PIL image, uint8 [H, W, 3], or float [H, W, 3] / [3, H, W] in [0, 1]
    boxes : [N, 4] absolute (x, y, w, h) pixels
    labels : [N] indices into ``names``
    scores : [N] or None
    names : sequence of str
    gt_boxes : [M, 4] absolute (x, y, w, h), drawn dashed white, optional
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[2] != 3:
        img = img.transpose(1, 2, 0)
    if img.dtype != np.uint8:
        img = np.clip(img, 0.0, 1.0)
    H, W = img.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    colours = plt.get_cmap("tab10")
    scale = max(1.0, 384.0 / max(H, W))
    fig = plt.figure(figsize=(W * scale / 100 + 0.2, H * scale / 100 + (0.45 if title else 0.2)), dpi=100)
    ax = fig.add_axes([0.02, 0.02, 0.96, 0.96 - (0.08 if title else 0)])
    try:
        ax.imshow(img, interpolation="nearest")
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.axis("off")
        if gt_boxes is not None:
            for x, y, w, h in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="white", lw=1.2, ls="--"))
        for (x, y, w, h), lab, sc in zip(boxes, labels, scores):
            if sc < score_threshold:
                continue
            c = colours(int(lab) % 10)
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec=c, lw=2))
            name = names[lab] if 0 <= lab < len(names) else str(lab)
            ax.text(x - 0.5, y - 0.5, f"{name} {sc:.2f}", fontsize=8, color="white", va="bottom",
                    bbox=dict(facecolor=c, edgecolor="none", pad=1, alpha=0.85), clip_on=True)
        if title:
            fig.suptitle(title, fontsize=9)
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path
