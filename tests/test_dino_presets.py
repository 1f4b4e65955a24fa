"""The ResNet-50 presets as DINO runs them: the backbone stages DINO freezes, and images too
small for 900 queries refused before anything is written (issue 8)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import damex
from damex.cli import main
from damex.data.config import ConfigError
from damex.models.backbone import resnet50
from damex.models.dino import DINO, PRESETS, encoder_tokens, min_square_side, preset

SMALL_MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
               "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
               "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
               "stem_width": 8, "dn_number": 12}


def write_cfg(folder, model=None, **train):
    cfg = {"model": dict(SMALL_MODEL, **(model or {})),
           "data": {"synthetic": {"root": str(folder / "data"), "preset": "tiny"}, "batch_size": 2,
                    "min_size": 48, "max_size": 64},
           "train": dict({"steps": 1, "out_dir": str(folder / "run"), "lr": 1e-2, "lr_backbone": 1e-2,
                          "clip_max_norm": 0.0}, **train)}
    path = folder / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


# ---------------------------------------------------------------- freezing


def test_resnet50_presets_freeze_what_dino_freezes():
    """DINO's BackboneBase: requires_grad False for every parameter whose name has none of
    layer2/layer3/layer4 (the stem conv1 and layer1; FrozenBatchNorm has buffers only)."""
    assert PRESETS["dino"].train_backbone_layers == (2, 3, 4)
    assert PRESETS["paper"].train_backbone_layers == (2, 3, 4)
    assert PRESETS["tiny"].train_backbone_layers == (0, 1, 2, 3, 4)   # trained from scratch
    net = resnet50()
    frozen = net.set_trainable_stages(PRESETS["paper"].train_backbone_layers)
    names = [n for n, _ in net.named_parameters()]
    dino_rule = [n for n in names if "layer2" not in n and "layer3" not in n and "layer4" not in n]
    assert frozen == dino_rule == ["conv1.weight"] + [n for n in names if n.startswith("layer1.")]
    assert all(p.requires_grad == (n not in frozen) for n, p in net.named_parameters())
    with pytest.raises(ValueError, match="0 = the stem"):
        net.set_trainable_stages((1, 5))


def test_frozen_stages_get_no_gradient_and_no_update(tmp_path, capsys):
    from damex.engine.config import load_run_config
    from damex.engine.train import Trainer

    cfg = load_run_config(write_cfg(tmp_path, model={"train_backbone_layers": [2, 3, 4]}))
    trainer = Trainer(cfg)
    model = trainer.model
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    trainer.train_step()
    frozen = [n for n, p in model.named_parameters()
              if n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1."))]
    assert frozen and all(not p.requires_grad and p.grad is None
                          for n, p in model.named_parameters() if n in frozen)
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, before[n], err_msg=n)
    trained = [n for n in before if n.startswith("backbone.layer2.")]
    assert trained and all(not np.array_equal(dict(model.named_parameters())[n].data, before[n])
                           for n in trained if n.endswith("conv1.weight"))
    # the optimizer holds no frozen parameter (as DINO's param_dicts)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for n, p in model.named_parameters() if n in frozen)


def test_train_backbone_layers_is_checked(tmp_path):
    from damex.engine.config import load_run_config
    with pytest.raises(ConfigError, match=r"model\.train_backbone_layers"):
        load_run_config(write_cfg(tmp_path, model={"train_backbone_layers": [2, 7]}))


# ---------------------------------------------------------------- image sizes


@pytest.mark.parametrize("hw", [(48, 48), (64, 96), (65, 33), (97, 131), (208, 208)])
def test_encoder_tokens_counts_what_the_model_flattens(hw):
    model = DINO(preset("tiny", routing="dense"))
    images = np.zeros((1, 3) + hw, np.float32)
    srcs, _ = model._features(images, np.zeros((1,) + hw, bool))
    assert encoder_tokens(model.cfg, *hw) == sum(s.shape[2] * s.shape[3] for s in srcs)


def test_min_square_side():
    cfg = PRESETS["paper"]
    n = min_square_side(cfg)
    assert encoder_tokens(cfg, n, n) >= 900 > encoder_tokens(cfg, n - 1, n - 1)


def test_paper_preset_on_small_images_fails_before_anything_is_written(tmp_path):
    """`damex train` with the paper preset (900 queries) on the shipped config's images (at
    most 96 pixels: 193 encoder tokens): a clear error naming both numbers, and the working
    folder left empty (no run folder, no log, not even the synthetic data)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(damex.__file__)))
    r = subprocess.run([sys.executable, "-m", "damex", "train", "--set", "model.preset=paper",
                        "--steps", "1", "--out", "run", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "model.num_queries is 900" in r.stderr and "at most 193 encoder tokens" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


def test_smallest_training_image_is_checked_before_the_run_folder(tmp_path, capsys):
    """Images of max_size give enough tokens, the smallest training image does not: the
    error names it and both numbers, and no run folder is made."""
    cfg = write_cfg(tmp_path, model={"num_queries": 60})    # 64 x 64: 85 tokens; 48 x 48: 50
    assert main(["train", str(cfg), "--no-progress"]) != 0
    msg = capsys.readouterr().err
    m = re.search(r"model.num_queries is 60 but training image .* gives (\d+) encoder tokens", msg)
    assert m and int(m.group(1)) < 60, msg
    assert "resized to" in msg and not (tmp_path / "run").exists()


def test_validation_images_are_checked_before_the_run_folder(tmp_path, capsys):
    """A run that validates (train.eval_every) checks its validation images too, resized
    as evaluation resizes them (data.min_size, no multiscale): a wide 256 x 16 image
    becomes 64 x 4 and gives fewer encoder tokens than the training images do.  The error
    names it and both numbers before the run folder (or its log) exists."""
    from PIL import Image

    from damex.data.synthetic import make_mixture

    first = make_mixture(tmp_path / "data", preset="tiny")["datasets"][0]
    (tmp_path / "val").mkdir()
    Image.new("RGB", (256, 16), (90, 120, 30)).save(tmp_path / "val" / "wide.png")
    train_ann = json.loads(open(first["train"]).read())
    val_ann = {"images": [{"id": 7, "file_name": "wide.png", "width": 256, "height": 16}],
               "annotations": [{"id": 1, "image_id": 7, "category_id": train_ann["categories"][0]["id"],
                                "bbox": [10, 2, 40, 10], "area": 400, "iscrowd": 0}],
               "categories": train_ann["categories"]}
    (tmp_path / "val.json").write_text(json.dumps(val_ann))
    cfg = json.loads(write_cfg(tmp_path, model={"num_queries": 40}).read_text())
    cfg["data"]["datasets"] = [{"name": first["name"], "train": first["train"], "img_dir": first["img_dir"],
                                "val": str(tmp_path / "val.json"), "val_img_dir": str(tmp_path / "val")}]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "cfg.json"), "--no-progress"]) == 0   # no validation: trains
    assert (tmp_path / "run" / "log.jsonl").exists()
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.json"), "--no-progress", "--out", str(tmp_path / "run2"),
                 "--set", "train.eval_every=1"]) != 0
    msg = capsys.readouterr().err
    m = re.search(r"model.num_queries is 40 but validation image 7 of \S+ \(256 x 16, resized to 64 x 4 "
                  r"by data.min_size = 48, data.max_size = 64\) gives (\d+) encoder tokens", msg)
    assert m and int(m.group(1)) < 40, msg
    assert not (tmp_path / "run2").exists()
