"""damex.data: the synthetic mixture, the COCO loader and its errors, transforms,
the joint label space, the mixture sampler, collate and the data config."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from damex.data import (CocoDetection, ConfigError, DatasetError, LabelSpace, MixtureDataset,
                        MixtureSampler, build_mixture, collate, data_config_from_dict,
                        iterate_batches, load_data_config, make_mixture)
from damex.data import synthetic, transforms as T


def tree_digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix") / "tiny"
    return make_mixture(root, seed=0, preset="tiny")


def copy_dataset(desc, name, tmp_path):
    """A private copy of one tiny dataset (for corrupting), returns (ann_file, img_dir)."""
    d = next(d for d in desc["datasets"] if d["name"] == name)
    dst = tmp_path / name
    shutil.copytree(os.path.dirname(d["img_dir"]), dst)
    return str(dst / "annotations" / "train.json"), str(dst / "images")


# ---------------------------------------------------------------- generator

def test_generator_same_seed_same_bytes(tmp_path, tiny):
    again = make_mixture(tmp_path / "again", seed=0, preset="tiny")
    assert tree_digest(tiny["root"]) == tree_digest(again["root"])
    other = make_mixture(tmp_path / "other", seed=1, preset="tiny")
    assert tree_digest(tiny["root"]) != tree_digest(other["root"])


def test_generator_layout_and_properties(tiny):
    names = [d["name"] for d in tiny["datasets"]]
    assert names == ["flat", "noise", "stripes", "sketch", "camo"]
    label_sets = {d["name"]: {c["name"] for c in d["categories"]} for d in tiny["datasets"]}
    # overlapping and disjoint label sets
    assert label_sets["flat"] & label_sets["noise"] == {"circle"}
    assert label_sets["flat"] & label_sets["sketch"] == {"triangle"}
    assert not label_sets["stripes"] & (label_sets["flat"] | label_sets["noise"] | label_sets["sketch"])
    assert label_sets["camo"] & label_sets["sketch"] == {"star"}
    assert label_sets["camo"] & label_sets["noise"] == {"cross"}
    assert "hexagon" in label_sets["camo"] - set().union(*(v for k, v in label_sets.items() if k != "camo"))
    # more datasets than the tiny model's experts: the map h is many-to-one
    from damex.models.dino import preset
    assert len(names) > preset("tiny").num_experts
    mean_side = {}
    for d in tiny["datasets"]:
        for split in ("train", "val"):
            coco = json.load(open(d[split]))
            assert len(coco["images"]) == d["num_" + split]
            for im in coco["images"]:
                with Image.open(os.path.join(d["img_dir"], im["file_name"])) as img:
                    assert img.size == (im["width"], im["height"]) and img.mode == "RGB"
            for a in coco["annotations"]:
                assert set(a) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
                assert a["area"] == a["bbox"][2] * a["bbox"][3]
        coco = json.load(open(d["train"]))
        mean_side[d["name"]] = np.mean([np.sqrt(a["area"]) for a in coco["annotations"]])
    # object scales differ: small in stripes, large in flat and sketch
    assert mean_side["stripes"] < mean_side["noise"] < mean_side["flat"]
    assert mean_side["stripes"] < 0.6 * mean_side["sketch"]
    # one dataset has few images, in the default preset as in the tiny one
    counts = {n: c[0] for n, c in synthetic.PRESETS["default"].items()}
    assert counts["sketch"] * 4 <= min(v for k, v in counts.items() if k != "sketch")
    assert sum(sum(c) for c in synthetic.PRESETS["default"].values()) < 1000


def test_generator_domains_differ(tiny):
    stats = {}
    for d in tiny["datasets"]:
        coco = json.load(open(d["train"]))
        img = np.asarray(Image.open(os.path.join(d["img_dir"], coco["images"][0]["file_name"])), np.float64)
        # brightness and high-frequency energy tell the styles apart
        stats[d["name"]] = (img.mean(), np.abs(np.diff(img, axis=1)).mean())
    assert stats["noise"][0] < 100 < stats["flat"][0]
    assert stats["noise"][1] > 3 * stats["flat"][1]
    assert stats["sketch"][0] > 200


def test_generator_reuses_and_refuses(tmp_path, tiny):
    again = make_mixture(tiny["root"], seed=0, preset="tiny")  # same -> reused, no rewrite
    assert again == tiny
    with pytest.raises(FileExistsError, match="seed=1"):
        make_mixture(tiny["root"], seed=1, preset="tiny")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_mixture(tmp_path / "x", preset="huge")
    assert not (tmp_path / "x").exists()


def test_generator_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic._render_image

    def failing(spec, rng):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk full (simulated)")
        return real(spec, rng)

    monkeypatch.setattr(synthetic, "_render_image", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        make_mixture(tmp_path / "mix", preset="tiny")
    assert os.listdir(tmp_path) == []  # neither root nor a temporary directory


def test_generator_removes_temporaries_of_a_killed_generation(tmp_path):
    dead = tmp_path / ".mix.tmp-999999999-abc"       # no such process: left by a killed run
    (dead / "flat").mkdir(parents=True)
    old = tmp_path / ".mix.old-xyz"
    old.mkdir()
    live = tmp_path / f".mix.tmp-{os.getpid()}-def"   # a generation still running: kept
    live.mkdir()
    make_mixture(tmp_path / "mix", preset="tiny")
    assert sorted(os.listdir(tmp_path)) == sorted(["mix", live.name])


def test_generator_overwrite_replaces_atomically(tmp_path):
    root = tmp_path / "mix"
    make_mixture(root, seed=0, preset="tiny")
    desc = make_mixture(root, seed=3, preset="tiny", overwrite=True)
    assert desc["seed"] == 3 and json.load(open(root / "mixture.json"))["seed"] == 3
    assert os.listdir(tmp_path) == ["mix"]


# ---------------------------------------------------------------- loader

def test_loader_round_trip(tiny):
    d = tiny["datasets"][2]  # stripes: 80 x 64, category ids 10 and 20
    ds = CocoDetection(d["name"], d["train"], d["img_dir"], verify_images=True)
    coco = json.load(open(d["train"]))
    assert len(ds) == len(coco["images"])
    img, t = ds[0]
    assert img.size == (80, 64)
    anns = [a for a in coco["annotations"] if a["image_id"] == t["image_id"]]
    assert t["boxes"].dtype == np.float32 and t["boxes"].shape == (len(anns), 4)
    x, y, w, h = np.array([a["bbox"] for a in anns], np.float64).T
    expect = np.stack([(x + w / 2) / 80, (y + h / 2) / 64, w / 80, h / 64], 1)
    np.testing.assert_allclose(t["boxes"], expect, atol=1e-6)
    assert t["category_ids"].tolist() == [a["category_id"] for a in anns]
    assert set(t["category_ids"].tolist()) <= {10, 20}
    assert t["local_labels"].tolist() == [{10: 0, 20: 1}[c] for c in t["category_ids"].tolist()]
    assert t["orig_size"].tolist() == [64, 80] and t["dataset_id"] == 0
    assert np.all((t["boxes"] >= 0) & (t["boxes"] <= 1))


def test_loader_images_without_boxes(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    coco = json.load(open(ann))
    first = coco["images"][0]["id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != first]
    json.dump(coco, open(ann, "w"))
    img, t = CocoDetection("flat", ann, img_dir)[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["labels"].dtype == np.int64


def test_error_corrupt_json(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    with open(ann, "w") as f:
        f.write('{"images": [}, "annotations": []}')
    with pytest.raises(DatasetError) as e:
        CocoDetection("flat", ann, img_dir)
    assert ann in str(e.value) and "invalid JSON" in str(e.value) and "line 1" in str(e.value)


def test_error_truncated_json(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    raw = open(ann, "rb").read()
    open(ann, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(DatasetError) as e:
        CocoDetection("flat", ann, img_dir)
    assert ann in str(e.value) and "invalid JSON" in str(e.value) and "truncated" in str(e.value)


def test_error_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.json: annotation file not found"):
        CocoDetection("x", str(tmp_path / "nope.json"), str(tmp_path))


def test_error_missing_image(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    victim = os.path.join(img_dir, json.load(open(ann))["images"][1]["file_name"])
    os.remove(victim)
    with pytest.raises(DatasetError) as e:
        CocoDetection("flat", ann, img_dir)
    assert victim in str(e.value) and "image file not found" in str(e.value)


def test_error_unreadable_image(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    victim = os.path.join(img_dir, json.load(open(ann))["images"][0]["file_name"])
    open(victim, "wb").write(b"\x89PNG\r\n\x1a\n this is not really a png")
    ds = CocoDetection("flat", ann, img_dir)  # existence is checked at build time...
    with pytest.raises(DatasetError) as e:
        ds[0]  # ...and the pixels when the image is read
    assert victim in str(e.value) and "cannot read image" in str(e.value)
    with pytest.raises(DatasetError, match="cannot read image"):
        CocoDetection("flat", ann, img_dir, verify_images=True)
    # a truncated PNG is unreadable too
    good = os.path.join(img_dir, json.load(open(ann))["images"][1]["file_name"])
    data = open(good, "rb").read()
    open(good, "wb").write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot read image"):
        ds[1]


def test_error_unknown_category(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    coco = json.load(open(ann))
    coco["annotations"][0]["category_id"] = 99
    aid = coco["annotations"][0]["id"]
    json.dump(coco, open(ann, "w"))
    with pytest.raises(DatasetError) as e:
        CocoDetection("flat", ann, img_dir)
    msg = str(e.value)
    assert ann in msg and "category id 99" in msg and f"annotation id {aid}" in msg


@pytest.mark.parametrize("bbox,problem", [([50, 10, 30, 20], "outside"),
                                          ([-5, 10, 20, 20], "outside"),
                                          ([10, 10, -1, 20], "non-positive"),  # zero: skipped
                                          ([10, 10, 5, "x"], "4 finite numbers")])
def test_error_bad_box(tmp_path, tiny, bbox, problem):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    coco = json.load(open(ann))
    coco["annotations"][0]["bbox"] = bbox
    aid = coco["annotations"][0]["id"]
    json.dump(coco, open(ann, "w"))
    with pytest.raises(DatasetError) as e:
        CocoDetection("flat", ann, img_dir)
    assert ann in str(e.value) and problem in str(e.value) and f"annotation id {aid}" in str(e.value)


def test_box_within_tolerance_is_clipped(tmp_path, tiny):
    ann, img_dir = copy_dataset(tiny, "flat", tmp_path)
    coco = json.load(open(ann))
    coco["annotations"][0]["bbox"] = [-0.5, 0, 10, 64.5]
    json.dump(coco, open(ann, "w"))
    ds = CocoDetection("flat", ann, img_dir)
    assert ds.coco["annotations"][0]["bbox"] == [0.0, 0.0, 9.5, 64.0]


# ---------------------------------------------------------------- transforms

def test_transforms_resize_flip_normalise():
    img = Image.fromarray(np.arange(64 * 80 * 3, dtype=np.uint8).reshape(64, 80, 3))
    target = {"boxes": np.array([[0.25, 0.5, 0.2, 0.4]], np.float32), "size": np.array([64, 80])}
    out, t = T.Resize(32, max_size=100)(img, target)
    assert out.size == (40, 32) and t["size"].tolist() == [32, 40]
    out, t = T.Resize(64, max_size=60)(img, target)  # longer side capped
    assert out.size == (60, 48)
    flipped, t2 = T.RandomHorizontalFlip(p=1.0, seed=0)(img, target)
    np.testing.assert_allclose(t2["boxes"], [[0.75, 0.5, 0.2, 0.4]])
    assert target["boxes"][0, 0] == 0.25  # not mutated
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    arr, _ = T.ToArray()(img, target)
    assert arr.shape == (3, 64, 80) and arr.dtype == np.float32 and arr.max() <= 1.0
    norm, _ = T.Normalize()(arr, target)
    np.testing.assert_allclose(norm[0, 0, 0], (arr[0, 0, 0] - 0.485) / 0.229, rtol=1e-6)
    # seeded flips repeat
    a = T.RandomHorizontalFlip(0.5, seed=4)
    b = T.RandomHorizontalFlip(0.5, seed=4)
    seq_a = [a(img, target)[1]["boxes"][0, 0] for _ in range(20)]
    seq_b = [b(img, target)[1]["boxes"][0, 0] for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) == 2


# ---------------------------------------------------------------- mixture

def test_label_space_merges_by_name():
    ls = LabelSpace([[{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
                     [{"id": 7, "name": "Circle "}, {"id": 9, "name": "cross"}],
                     [{"id": 10, "name": "ring"}]], ["a", "b", "c"])
    assert ls.names == ["circle", "square", "cross", "ring"] and ls.num_classes == 4
    assert ls.to_joint(1, [7, 9]).tolist() == [0, 2]
    assert ls.to_local(1, [0, 1, 2, 3]).tolist() == [7, -1, 9, -1]
    assert ls.dataset_mask().tolist() == [[True, True, False, False], [True, False, True, False],
                                          [False, False, False, True]]
    with pytest.raises(ValueError, match="category id 3 is not in dataset 'a'"):
        ls.to_joint(0, [3])
    apart = LabelSpace([[{"id": 1, "name": "circle"}], [{"id": 1, "name": "circle"}]], ["a", "b"],
                       merge_by_name=False)
    assert apart.names == ["a/circle", "b/circle"]


def test_mixture_dataset_joint_labels(tiny):
    mix = MixtureDataset([CocoDetection(d["name"], d["train"], d["img_dir"]) for d in tiny["datasets"]])
    assert mix.label_space.names == ["circle", "square", "triangle", "cross", "ring", "diamond", "star",
                                     "hexagon"]
    assert len(mix) == sum(mix.sizes)
    for d, ds in enumerate(mix.datasets):
        _, t = mix[d, 0]
        assert t["dataset_id"] == d
        assert t["labels"].tolist() == mix.label_space.to_joint(d, t["category_ids"]).tolist()
    # circle of flat and circle of noise share one joint label
    assert mix.label_space.local_to_joint[0][1] == mix.label_space.local_to_joint[1][1] == 0
    assert mix[mix.sizes[0]][1]["dataset_id"] == 1  # flat indexing crosses into dataset 1


def test_sampler_proportional_is_one_epoch():
    s = MixtureSampler([5, 3, 2], "proportional", seed=1)
    pairs = list(s)
    assert sorted(pairs) == [(d, i) for d, n in enumerate([5, 3, 2]) for i in range(n)]
    assert pairs == list(MixtureSampler([5, 3, 2], "proportional", seed=1))
    assert pairs != list(MixtureSampler([5, 3, 2], "proportional", seed=2))
    s.set_epoch(1)
    assert list(s) != pairs


@pytest.mark.parametrize("mode,weights,expect", [
    ("proportional", None, [0.6, 0.3, 0.1]),
    ("uniform", None, [1 / 3, 1 / 3, 1 / 3]),
    ("weighted", [1.0, 1.0, 2.0], [0.25, 0.25, 0.5])])
def test_sampler_proportions(mode, weights, expect):
    sizes = [60, 30, 10]
    s = MixtureSampler(sizes, mode, weights=weights, seed=0, num_samples=6000)
    pairs = list(s)
    assert pairs == list(MixtureSampler(sizes, mode, weights=weights, seed=0, num_samples=6000))
    ds = np.array([d for d, _ in pairs])
    np.testing.assert_allclose(np.bincount(ds, minlength=3) / len(ds), expect, atol=0.03)
    for d, i in pairs:
        assert 0 <= i < sizes[d]
    # the small dataset is cycled through, not sampled with gaps
    small = [i for d, i in pairs if d == 2][:10]
    assert sorted(small) == list(range(10))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown mode 'random'"):
        MixtureSampler([1, 2], "random")
    with pytest.raises(ValueError, match="one weight per dataset"):
        MixtureSampler([1, 2], "weighted", weights=[1.0])
    with pytest.raises(ValueError, match="only used with mode 'weighted'"):
        MixtureSampler([1, 2], "uniform", weights=[1.0, 1.0])


def test_collate_mixes_datasets(tiny):
    tf = T.default_transforms(train=True, min_size=64, max_size=96, seed=0)
    mix = MixtureDataset([CocoDetection(d["name"], d["train"], d["img_dir"], transforms=tf)
                          for d in tiny["datasets"]])
    batch = collate([mix[0, 0], mix[2, 1], mix[3, 0]])
    assert batch["images"].shape == (3, 3, 64, 80) and batch["images"].dtype == np.float32
    assert batch["mask"].shape == (3, 64, 80) and batch["mask"].dtype == np.bool_
    assert batch["dataset_ids"].tolist() == [0, 2, 3] and batch["dataset_ids"].dtype == np.int64
    # 64 x 64 images are padded on the right; the 80-wide one is not
    assert batch["mask"][0, :, 64:].all() and not batch["mask"][0, :, :64].any()
    assert not batch["mask"][1].any()
    assert np.all(batch["images"][0, :, :, 64:] == 0)
    assert batch["image_sizes"].tolist() == [[64, 64], [64, 80], [64, 64]]
    assert [t["dataset_id"] for t in batch["targets"]] == [0, 2, 3]
    batches = list(iterate_batches(mix, MixtureSampler(mix.sizes, "uniform", seed=0), 4))
    assert sum(len(b["targets"]) for b in batches) == len(mix)
    assert len({int(d) for b in batches for d in b["dataset_ids"]}) == len(mix.datasets) == 5


# ---------------------------------------------------------------- config

def test_config_loads_and_rejects_unknown_keys(tmp_path, tiny):
    good = tmp_path / "run.json"
    good.write_text(json.dumps({"data": {"synthetic": {"root": tiny["root"], "preset": "tiny"},
                                         "sampler": "weighted", "weights": [1, 1, 1, 2, 1],
                                         "batch_size": 2}, "model": {"anything": 1}}))
    cfg = load_data_config(good)
    assert cfg.sampler == "weighted" and cfg.batch_size == 2 and cfg.synthetic.preset == "tiny"
    mix = build_mixture(cfg, "val")
    assert mix.names == ["flat", "noise", "stripes", "sketch", "camo"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"batch_size": 2, "bach_size": 3}}))
    with pytest.raises(ConfigError) as e:
        load_data_config(bad)
    assert str(bad) in str(e.value) and "unknown key 'bach_size'" in str(e.value)
    bad.write_text(json.dumps({"synthetic": {"presets": "tiny"}}))
    with pytest.raises(ConfigError, match="unknown key 'synthetic.presets'"):
        load_data_config(bad)
    bad.write_text(json.dumps({"datasets": [{"name": "a", "train": "t.json", "val": "v.json",
                                             "img_dir": "i", "imgdir": "j"}]}))
    with pytest.raises(ConfigError, match=r"unknown key 'datasets\[0\].imgdir'"):
        load_data_config(bad)
    with pytest.raises(ConfigError, match="wrong type"):
        data_config_from_dict({"batch_size": "4"})
    bad.write_text('{"data": {')
    with pytest.raises(ConfigError, match="bad.json: invalid JSON"):
        load_data_config(bad)


def test_config_resolves_relative_paths(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"datasets": [{"name": "a", "train": "a/train.json", "val": "a/val.json",
                                           "img_dir": "a/images"}]}))
    cfg = load_data_config(p)
    assert cfg.datasets[0].train == str(tmp_path / "a" / "train.json")
    assert cfg.synthetic.root == str(tmp_path / "data" / "synthetic")


def test_default_preset_is_the_documented_mixture(tmp_path):
    desc = make_mixture(tmp_path / "default", seed=0)
    counts = {d["name"]: (d["num_train"], d["num_val"]) for d in desc["datasets"]}
    assert counts == {"flat": (160, 40), "noise": (160, 40), "stripes": (160, 40), "sketch": (24, 16),
                      "camo": (160, 40)}
    for d in desc["datasets"]:
        for split in ("train", "val"):
            coco = json.load(open(d[split]))
            assert len(coco["images"]) == d["num_" + split]
            # every class of the dataset occurs in both splits, so every AP is defined
            assert {a["category_id"] for a in coco["annotations"]} == {c["id"] for c in d["categories"]}
            per_image = np.bincount([a["image_id"] for a in coco["annotations"]],
                                    minlength=len(coco["images"]) + 1)[1:]
            assert per_image.max() <= d["objects_per_image"][1]
