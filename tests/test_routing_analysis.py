"""damex.engine.routing_analysis on hand-made routing records, and the PNG figures."""
import json

import numpy as np
import pytest
from PIL import Image

from damex.engine.routing_analysis import (analyse_routing, default_assignment, draw_detections,
                                           expert_load, plot_routing_heatmap, plot_training_curves,
                                           routing_accuracy, routing_matrix)

# 3 datasets, 4 experts. dataset 0: 4 tokens (3 to E0, 1 to E1); dataset 1: 2 tokens
# (both E1); dataset 2: 4 tokens (2 to E2, 1 to E3, 1 to E0).
DS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
EX = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 0])


def test_matrix_accuracy_load_by_hand():
    m = routing_matrix(DS, EX, 3, 4)
    np.testing.assert_allclose(m, [[0.75, 0.25, 0, 0], [0, 1, 0, 0], [0.25, 0, 0.5, 0.25]])
    acc, per = routing_accuracy(DS, EX, default_assignment(3, 4))
    assert acc == pytest.approx(7 / 10)
    np.testing.assert_allclose(per, [0.75, 1.0, 0.5])
    np.testing.assert_allclose(expert_load(EX, 4), [0.4, 0.3, 0.2, 0.1])
    assert default_assignment(5, 2).tolist() == [0, 1, 0, 1, 0]


def test_top2_and_missing_dataset():
    ex = np.array([[0, 1], [0, 2], [1, 0]])
    m = routing_matrix([0, 0, 1], ex, 3, 3)
    np.testing.assert_allclose(m, [[0.5, 0.25, 0.25], [0.5, 0.5, 0], [0, 0, 0]])
    acc, per = routing_accuracy([0, 0, 1], ex, [0, 1, 2])
    assert acc == 1.0 and np.isnan(per[2])
    with pytest.raises(ValueError, match="expert ids must lie in"):
        routing_matrix([0], [5], 1, 4)
    with pytest.raises(ValueError, match=r"\[T\] or \[T, k\]"):
        routing_matrix([0, 1], [0], 2, 2)


def test_analyse_routing_layers_and_batches():
    out = analyse_routing({"dec0": (DS, EX), "dec2": ([DS[:4], DS[4:]], [EX[:4], EX[4:]])}, 3, 4)
    assert out["dec0"]["accuracy"] == pytest.approx(0.7)
    assert out["dec2"] == out["dec0"]
    json.dumps(out)
    swapped = analyse_routing([(DS, EX)], 3, 4, assignment=[1, 0, 2])
    assert swapped["layer0"]["accuracy"] == pytest.approx((1 + 0 + 2) / 10)


def open_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def test_plots_write_pngs(tmp_path):
    m = routing_matrix(DS, EX, 3, 4)
    w, h = open_png(plot_routing_heatmap(m, ["flat", "noise", "stripes"], tmp_path / "heat.png",
                                         title="decoder layer 0"))
    assert w > 200 and h > 100
    hist = [{"step": s, "loss": 3.0 / (1 + s), "loss_routing": 0.5 / (1 + s) + 0.1,
             "mean_ap": min(0.4, 0.02 * s)} for s in range(0, 200, 10)]
    open_png(plot_training_curves(hist, tmp_path / "curves.png", title="tiny DINO on the synthetic mixture"))
    open_png(plot_training_curves({"loss": [3, 2, 1.5]}, tmp_path / "curves2.png"))
    img = np.full((64, 80, 3), 200, np.uint8)
    img[10:30, 20:44] = (220, 40, 40)
    open_png(draw_detections(img, [[20, 10, 24, 20], [50, 35, 20, 20]], [0, 2], [0.93, 0.41],
                             ["circle", "square", "cross"], tmp_path / "det.png",
                             gt_boxes=[[20, 10, 24, 20]], title="flat val 1"))
    with pytest.raises(ValueError, match="dataset names"):
        plot_routing_heatmap(m, ["a"], tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "curves2.png", "det.png", "heat.png"]


def test_failed_plot_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, f, **kw):
        f.write(b"\x89PNG half")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="simulated"):
        plot_routing_heatmap(np.eye(2), ["a", "b"], tmp_path / "heat.png")
    assert list(tmp_path.iterdir()) == []
