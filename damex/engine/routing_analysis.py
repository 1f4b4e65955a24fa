"""Routing analysis of a model's MoE layers over a dataset, and the figures of a run
(numpy + matplotlib Agg).

The statistics themselves live in :mod:`damex.routing` (their one home) and are
re-exported here: :func:`routing_matrix`, :func:`routing_accuracy`,
:func:`routing_purity`, :func:`expert_load`, :func:`default_assignment`.
:func:`analyse_routing` applies them to every layer's records gathered over many
batches.  Figures: :func:`plot_routing_heatmap`, :func:`plot_training_curves`,
:func:`draw_detections`, each writing a PNG.
"""
import os
import tempfile

import numpy as np

from ..routing import (expert_load, expert_map, routing_accuracy, routing_matrix,  # noqa: F401
                       routing_purity, summarize)


def default_assignment(num_datasets, num_experts):
    """DAMEX's default h: dataset d -> expert ``d mod E`` (see :func:`damex.routing.expert_map`)."""
    return expert_map(None, num_experts, num_datasets)


def _concat(ds, ex):
    """One layer's (dataset ids, experts), given whole or as lists of per-batch arrays."""
    if isinstance(ds, (list, tuple)) and len(ds) and np.ndim(ds[0]) >= 1:
        parts = [np.ravel(x) for x in ds]
        ex = np.concatenate([np.asarray(x).reshape(len(p), -1) for x, p in zip(ex, parts)])
        ds = np.concatenate(parts)
    return ds, ex


def analyse_routing(records, num_datasets, num_experts, assignment=None):
    """Routing statistics of every MoE layer.

    Parameters
    ----------
    records : dict or sequence
        ``{layer_name: record}`` (or a list of records, named ``layer0``, ``layer1``, ...);
        a record is ``(dataset_ids [T], experts [T] or [T, k])``, either whole or as lists
        of per-batch arrays, or a dict ``{"dataset_ids", "experts", "kept", "routed"}`` as
        :func:`damex.engine.inference.predict` gathers it (then the dropped fraction is
        reported too).
    assignment : array [D], optional
        h(d); defaults to :func:`default_assignment`.

    Returns
    -------
    dict
        ``{layer: {"matrix": [[...]], "accuracy", "per_dataset_accuracy": [...], "purity",
        "load": [...], "dropped_fraction"}}`` with plain lists (NaN where a dataset has no
        tokens; ``dropped_fraction`` None when the records carry no slot counts).
    """
    if not isinstance(records, dict):
        records = {f"layer{i}": r for i, r in enumerate(records)}
    h = default_assignment(num_datasets, num_experts) if assignment is None else np.asarray(assignment)
    out = {}
    for layer, rec in records.items():
        kept = routed = None
        if isinstance(rec, dict):
            ds, ex, kept, routed = rec["dataset_ids"], rec["experts"], rec.get("kept"), rec.get("routed")
        else:
            ds, ex = rec
        ds, ex = _concat(ds, ex)
        out[layer] = summarize(ds, ex, num_datasets, num_experts, assignment=h, kept=kept, routed=routed)
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


def place_label(x, y, w, h, placed, W, H):
    """Top-left corner for a ``w`` x ``h`` label wanted at ``(x, y)`` in an image of
    ``W`` x ``H`` pixels (pixel centres at integers): inside the image, and at the free
    spot nearest the wanted one that overlaps none of the ``placed`` labels
    ``[(x, y, w, h)]`` (the wanted spot, clipped, when there is no free one)."""
    x = float(np.clip(x, -0.5, max(W - 0.5 - w, -0.5)))
    lo, hi = -0.5, max(H - 0.5 - h, -0.5)
    wanted = float(np.clip(y, lo, hi))
    spots = {wanted, lo, hi} | {float(np.clip(v, lo, hi)) for px, py, pw, ph in placed
                                for v in (py + ph, py - h)}
    for c in sorted(spots, key=lambda c: (abs(c - wanted), c)):
        if not any(x < px + pw and px < x + w and c < py + ph and py < c + h for px, py, pw, ph in placed):
            return x, c
    return x, wanted


def detections_figure(image, boxes, labels, scores, names, score_threshold=0.0, gt_boxes=None,
                      title=None):
    """The matplotlib figure of :func:`draw_detections` (the caller closes it)."""
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
    try:
        ax = fig.add_axes([0.02, 0.02, 0.96, 0.96 - (0.08 if title else 0)])
        ax.imshow(img, interpolation="nearest")
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.axis("off")
        if gt_boxes is not None:   # solid black under dashed white: visible on any background
            for x, y, w, h in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="black", lw=2.4))
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="white", lw=1.2, ls="--"))
        if title:
            fig.suptitle(title, fontsize=9)
        # each label measured as drawn (text and its box), in image pixels, then placed
        renderer = fig.canvas.get_renderer()
        ax.apply_aspect()
        inv = ax.transData.inverted()
        placed = []
        pad = 1.0 * fig.dpi / 72.0                  # the label box's pad, points -> display px
        for (x, y, w, h), lab, sc in zip(boxes, labels, scores):
            if sc < score_threshold:
                continue
            c = colours(int(lab) % 10)
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec=c, lw=2))
            name = names[lab] if 0 <= lab < len(names) else str(lab)
            t = ax.text(0, 0, f"{name} {sc:.2f}", fontsize=8, color="white", va="top", ha="left",
                        bbox=dict(facecolor=c, edgecolor="none", pad=1, alpha=0.85), clip_on=True)
            ext = t.get_window_extent(renderer)
            (x0, y0), (x1, y1) = inv.transform([(0, 0), (ext.width + 2 * pad, ext.height + 2 * pad)])
            tw, th = abs(x1 - x0), abs(y1 - y0)
            off = abs(inv.transform([(pad, 0)])[0][0] - x0)
            want = y - 0.5 - th if y - 0.5 - th >= -0.5 else y - 0.5   # above the box, else inside
            tx, ty = place_label(x - 0.5, want, tw, th, placed, W, H)
            placed.append((tx, ty, tw, th))
            t.set_position((tx + off, ty + off))   # the text sits inside its box's pad
    except BaseException:
        plt.close(fig)
        raise
    return fig


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
    gt_boxes : [M, 4] absolute (x, y, w, h), optional: drawn dashed white over a
        solid black outline, visible on any background

    Each label is measured as drawn and kept inside the image, off the labels before
    it where there is room (:func:`place_label`).
    """
    plt = _pyplot()
    fig = detections_figure(image, boxes, labels, scores, names, score_threshold, gt_boxes, title)
    try:
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path
