"""The DINO-DAMEX detector end to end: dataset ids reach the right tokens,
a tiny model overfits a mixed batch, checkpoints round-trip and resume
exactly, the paper preset runs a step, configs are checked."""
import json

import numpy as np
import pytest

from damex.data.config import ConfigError
from damex.engine.config import run_config_from_dict
from damex.engine.evaluate import boxes_to_xywh, coco_ap, coco_results
from damex.engine.train import Trainer, build_model
from damex.models.dino import preset
from damex.models.postprocess import postprocess

SMALL = {"d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2, "enc_layers": 1, "dec_layers": 2,
         "num_queries": 12, "moe_decoder_layers": [0, 1], "num_experts": 4, "moe_hidden": 64,
         "backbone_widths": [8, 16, 32, 32], "stem_width": 8, "dn_number": 12}


def run_cfg(root, hflip=0.5, **train):
    return run_config_from_dict({
        "model": dict(SMALL, preset="tiny"),
        "data": {"synthetic": {"root": str(root), "preset": "tiny"}, "batch_size": 3,
                 "sampler": "uniform", "min_size": 48, "max_size": 64, "hflip": hflip},
        "train": dict({"steps": 4, "out_dir": str(root / "run"), "checkpoint_every": 0, "lr": 1e-3,
                       "lr_backbone": 1e-3}, **train)})


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(run_cfg(tmp_path_factory.mktemp("data")))


def _capture_moe_inputs(model):
    """Wrap every MoE module so each call records (tokens x, dataset_ids given)."""
    calls = []
    for name, m in model.named_modules():
        if type(m).__name__ == "MoE":
            orig = m.forward

            def wrapped(x, ctx=None, dataset_ids=None, expert_target=None, mask=None, _orig=orig,
                        _name=name):
                calls.append((_name, np.array(x.data, copy=True),
                              None if dataset_ids is None else np.array(dataset_ids)))
                return _orig(x, ctx, dataset_ids=dataset_ids, expert_target=expert_target, mask=mask)
            object.__setattr__(m, "forward", wrapped)
    return calls


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_dataset_ids_reach_the_right_tokens(trainer, batch):
    """Token b * Q + q of an MoE layer is query q of image b and carries image b's dataset:
    a query-major flattening would pair image 0's tokens with other images' ids."""
    model = trainer.model
    mix = trainer.train_set
    pairs = [(d % len(mix.datasets), d // len(mix.datasets)) for d in range(batch)]
    samples = [mix[d, i] for d, i in pairs]
    from damex.data.mixture import collate
    b = collate(samples)
    ids = b["dataset_ids"]
    assert batch == 1 or len(set(ids.tolist())) > 1
    model.train()
    calls = _capture_moe_inputs(model)
    for m in model.modules():   # dropless, so one image's routing cannot depend on the others'
        if type(m).__name__ == "MoE":
            m.capacity_factor = None
    trainer_targets = b["targets"]
    out = model(b["images"], b["mask"], ids, trainer_targets)
    assert calls, "no MoE layer ran"
    for name, x, got in calls:
        T = x.shape[0]
        assert T % batch == 0
        Q = T // batch
        np.testing.assert_array_equal(got, np.repeat(ids, Q), err_msg=name)
    # the same images one at a time (eval: no denoising queries, deterministic) give the
    # same rows at the same batch-major positions
    model.eval()
    calls.clear()
    model(b["images"], b["mask"], ids)
    batched = [x for _, x, _ in calls]
    for k in range(batch):
        calls.clear()
        one = collate([samples[k]])
        if one["images"].shape != b["images"][k:k + 1].shape:
            continue
        model(b["images"][k:k + 1], b["mask"][k:k + 1], ids[k:k + 1])
        for xb, (_, x1, _) in zip(batched, calls):
            Q = x1.shape[0]
            np.testing.assert_allclose(xb[k * Q:(k + 1) * Q], x1, rtol=1e-4, atol=1e-4)
    routing = out["routing"]
    assert len(routing.losses) == 2 and all(float(a.data) > 0 for _, a in routing.losses)


def test_tiny_model_overfits_one_mixed_batch(tmp_path):
    # no flips: the batch is scored against the annotation files
    tr = Trainer(run_cfg(tmp_path, hflip=0.0, steps=200, lr=2e-3, lr_backbone=2e-3))
    mix = tr.train_set
    fixed = [(0, 0), (1, 0), (2, 0), (3, 0)]
    from damex.data.mixture import collate
    batch = collate([mix[d, i] for d, i in fixed])
    tr.batch = lambda step: batch

    def matching_loss(rec):  # the last decoder layer's weighted matching loss
        return rec["loss_ce"] + 5 * rec["loss_bbox"] + 2 * rec["loss_giou"]
    first = matching_loss(tr.train_step())
    for _ in range(199):
        last = matching_loss(tr.train_step())
    assert last < first / 10, (first, last)
    tr.model.eval()
    out = tr.model(batch["images"], batch["mask"], batch["dataset_ids"])
    dets = postprocess(out["pred_logits"].data, out["pred_boxes"].data, num_select=20)
    preds = {}
    for (d, i), t, det in zip(fixed, batch["targets"], dets):
        ds = mix.datasets[d]
        preds.setdefault(ds.name, {})[t["image_id"]] = {
            "boxes": boxes_to_xywh(det["boxes"], t["orig_size"]), "scores": det["scores"],
            "labels": det["labels"]}
    # score only the images of the batch, each against its own dataset's ground truth
    aps = []
    for (d, i), t in zip(fixed, batch["targets"]):
        ds = mix.datasets[d]
        gt = dict(ds.coco, images=[im for im in ds.coco["images"] if im["id"] == t["image_id"]],
                  annotations=[a for a in ds.coco["annotations"] if a["image_id"] == t["image_id"]])
        res = coco_results(ds, {t["image_id"]: preds[ds.name][t["image_id"]]})
        aps.append(coco_ap(gt, res)[1])
    assert np.mean(aps) > 0.9, aps


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    tr = Trainer(run_cfg(tmp_path, steps=5))
    for _ in range(3):
        tr.train_step()
    path = tr.save(str(tmp_path / "ckpt.npz"))
    again = Trainer.from_checkpoint(path)
    for (n1, p1), (n2, p2) in zip(tr.model.named_parameters(), again.model.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)
    a = [tr.train_step()["loss"] for _ in range(2)]
    b = [again.train_step()["loss"] for _ in range(2)]
    assert a == b
    for (_, p1), (_, p2) in zip(tr.model.named_parameters(), again.model.named_parameters()):
        np.testing.assert_array_equal(p1.data, p2.data)


def test_paper_preset_runs_one_step():
    cfg = preset("paper", num_classes=5, dataset_to_expert=(0, 1))
    from damex.models.dino import DINO
    model = DINO(cfg)
    n_params = sum(p.data.size for p in model.parameters())
    assert n_params > 40e6  # ResNet-50-sized backbone + 6/6 layers + 8 experts x 3 layers
    from damex.models.criterion import SetCriterion
    rng = np.random.default_rng(0)
    images = rng.normal(size=(1, 3, 256, 256)).astype(np.float32)
    targets = [{"boxes": np.array([[0.5, 0.5, 0.2, 0.3]], np.float32), "labels": np.array([2])}]
    out = model(images, np.zeros((1, 256, 256), bool), np.array([1]), targets)
    assert out["pred_logits"].shape == (1, 900, 5)
    loss, terms = SetCriterion(5)(out, targets)
    loss.backward()
    assert np.isfinite(float(loss.data))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and np.abs(g).sum() > 0 for g in grads)


def test_unknown_config_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        run_config_from_dict({"train": {"bogus": 1}})
    with pytest.raises(ConfigError, match="colour"):
        run_config_from_dict({"model": {"colour": "red"}})
    with pytest.raises(ConfigError, match="extra"):
        run_config_from_dict({"extra": {}})
    p = tmp_path / "bad.json"
    p.write_text('{"model": {"preset": "tiny"},')
    from damex.engine.config import load_run_config
    with pytest.raises(ConfigError, match="bad.json"):
        load_run_config(p)


def test_build_model_checks_the_expert_map(trainer):
    with pytest.raises(ValueError, match="dataset_to_expert"):
        build_model(run_cfg_with_map(trainer, (0, 1)), 7, 4)


def run_cfg_with_map(trainer, mapping):
    cfg = trainer.cfg
    import dataclasses
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dataset_to_expert=mapping))


@pytest.mark.parametrize("routing", ["dense", "moe", "damex"])
def test_routing_modes_train_a_step(tmp_path, routing):
    """One config switch gives the dense DINO, the plain MoE (balance loss) or DAMEX."""
    cfg = run_cfg(tmp_path)
    import dataclasses
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, routing=routing))
    tr = Trainer(cfg)
    moes = [m for m in tr.model.modules() if type(m).__name__ == "MoE"]
    seen, crit = {}, tr.criterion
    tr.criterion = lambda outputs, targets: (seen.setdefault("ctx", outputs["routing"]), crit(outputs, targets))[1]
    rec = tr.train_step()
    assert np.isfinite(rec["loss"])
    if routing == "dense":
        assert not moes and "loss_routing" not in rec
        return
    assert len(moes) == 2 and "loss_routing" in rec
    losses = seen["ctx"].records[0][1]["losses"]
    if routing == "moe":
        assert set(losses) == {"importance", "load"}
    else:
        assert set(losses) == {"damex"}
    # the routing loss reaches the router weights
    assert all(np.abs(m.w_router.grad).sum() > 0 for m in moes)
