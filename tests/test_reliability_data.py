"""Regression tests for the COCO and image defects of issue 12 (#7, #13, #19).

Every error names the file and the problem (DatasetError, a ValueError the CLI
reports without a traceback); zero-size boxes are skipped with a warning.
"""
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from damex.data import CocoDetection, DatasetError, load_coco_json, read_image
from damex.data import transforms as T
from damex.data.coco import DatasetWarning


def write_dataset(tmp_path, images=None, annotations=None, categories=None, size=(16, 12)):
    """A one-image COCO dataset in ``tmp_path``: returns (ann_file, img_dir)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    W, H = size
    Image.new("RGB", (W, H), (10, 20, 30)).save(img_dir / "a.png")
    coco = {"images": images if images is not None else
            [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
            "annotations": annotations if annotations is not None else
            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 4]}],
            "categories": categories if categories is not None else [{"id": 1, "name": "thing"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return str(ann), str(img_dir)


def with_annotation(tmp_path, **fields):
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 4]}
    a.update(fields)
    return write_dataset(tmp_path, annotations=[a])


# ---------------------------------------------------------------- #7 image modes

def test_16bit_grayscale_png_keeps_its_full_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    path = str(tmp_path / "ramp16.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    arr, _ = T.ToArray()(read_image(path), {})
    assert arr.shape == (3, 32, 64) and arr.dtype == np.float32
    assert arr.min() == 0.0 and arr.max() == 1.0
    assert abs(arr.mean() - 0.5) < 1e-3                        # was 254.5 / 255 (clipped at 255)
    np.testing.assert_allclose(arr[1], ramp / 65535.0, atol=1e-6)
    np.testing.assert_array_equal(arr[0], arr[2])


def test_16bit_image_through_the_dataset_and_resize(tmp_path):
    ann, img_dir = write_dataset(tmp_path)
    ramp = (np.arange(16 * 12).reshape(12, 16) * 300).astype(np.uint16)
    Image.fromarray(ramp).save(os.path.join(img_dir, "a.png"))
    ds = CocoDetection("x", ann, img_dir, transforms=T.default_transforms(False, 24, 40, normalize=False),
                       verify_images=True)
    img, t = ds[0]
    assert img.shape == (3, 24, 32) and img.max() > 0.8 and img.min() >= 0.0
    assert abs(img.mean() - ramp.mean() / 65535) < 0.02       # clipped at 255 it was ~1
    assert list(t["size"]) == [24, 32]


@pytest.mark.parametrize("mode,value,ext,expect", [
    ("L", 128, "png", 128 / 255), ("LA", (128, 7), "png", 128 / 255),
    ("1", 1, "png", 1.0), ("RGBA", (128, 128, 128, 0), "png", 128 / 255),
    ("CMYK", (0, 0, 0, 0), "tif", 1.0), ("I", 32768, "tif", 32768 / 65535),
    ("F", 0.25, "tif", 0.25), ("I;16", 65535, "png", 1.0)])
def test_every_mode_maps_to_three_channels_in_unit_range(tmp_path, mode, value, ext, expect):
    path = str(tmp_path / f"img.{ext}")
    Image.new(mode, (5, 4), value).save(path)
    arr, _ = T.ToArray()(read_image(path), {})
    assert arr.shape == (3, 4, 5) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, expect, rtol=1e-6)


def test_palette_image(tmp_path):
    path = str(tmp_path / "p.png")
    Image.new("RGB", (5, 4), (255, 0, 0)).convert("P").save(path)
    arr, _ = T.ToArray()(read_image(path), {})
    np.testing.assert_allclose(arr[:, 0, 0], [1, 0, 0])


@pytest.mark.parametrize("mode,value,problem", [("F", 3.5, "mode F"), ("I", 70000, "mode I"),
                                                ("I", -3, "mode I"), ("F", float("nan"), "mode F")])
def test_pixel_values_without_a_known_range_name_the_file(tmp_path, mode, value, problem):
    path = str(tmp_path / "x.tif")
    Image.new(mode, (3, 2), value).save(path)
    with pytest.raises(DatasetError) as e:
        read_image(path)
    assert path in str(e.value) and problem in str(e.value)


# ---------------------------------------------------------------- #13 wrong JSON types

@pytest.mark.parametrize("file_name", [7, None, "", ["a.png"]])
def test_file_name_of_the_wrong_type(tmp_path, file_name):
    ann, img_dir = write_dataset(tmp_path, images=[{"id": 1, "file_name": file_name,
                                                    "width": 16, "height": 12}], annotations=[])
    with pytest.raises(DatasetError) as e:
        CocoDetection("x", ann, img_dir)
    assert ann in str(e.value) and "file_name" in str(e.value) and "image id 1" in str(e.value)


@pytest.mark.parametrize("field,value", [("id", [1]), ("id", {"a": 1}), ("id", "1"),
                                         ("image_id", [1]), ("image_id", {"a": 1}),
                                         ("category_id", [1]), ("category_id", {"a": 1}),
                                         ("category_id", None), ("id", True),
                                         ("category_id", 2**64), ("image_id", -2**63 - 1)])
def test_annotation_ids_of_the_wrong_type(tmp_path, field, value):
    ann, img_dir = with_annotation(tmp_path, **{field: value})
    with pytest.raises(DatasetError) as e:
        load_coco_json(ann)
    assert ann in str(e.value) and "not an integer" in str(e.value) and repr(value) in str(e.value)


def test_category_name_of_the_wrong_type(tmp_path):
    ann, img_dir = write_dataset(tmp_path, categories=[{"id": 1, "name": None}])
    with pytest.raises(DatasetError, match="name None is not a string") as e:
        load_coco_json(ann)
    assert ann in str(e.value)


def _png_claiming_size(path, width, height):
    """A valid 1x1 PNG whose IHDR says width x height (a decompression-bomb header)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(open(path, "rb").read())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    open(path, "wb").write(bytes(data))


def test_decompression_bomb_header_names_the_file(tmp_path):
    path = str(tmp_path / "bomb.png")
    _png_claiming_size(path, 100_000, 100_000)
    with pytest.raises(DatasetError) as e:
        read_image(path)
    assert path in str(e.value) and "decompression bomb" in str(e.value)


# ---------------------------------------------------------------- #19 notes

@pytest.mark.parametrize("crowd", ["yes", 2, -1, 1.0, None, [1]])
def test_iscrowd_must_be_zero_or_one(tmp_path, crowd):
    ann, _ = with_annotation(tmp_path, iscrowd=crowd)
    with pytest.raises(DatasetError) as e:
        load_coco_json(ann)
    assert ann in str(e.value) and "iscrowd must be 0 or 1" in str(e.value) and "annotation id 1" in str(e.value)


@pytest.mark.parametrize("crowd,kept", [(0, 1), (1, 0), (False, 1), (True, 0)])
def test_iscrowd_ints_and_bools(tmp_path, crowd, kept):
    ann, img_dir = with_annotation(tmp_path, iscrowd=crowd)
    ds = CocoDetection("x", ann, img_dir)
    assert ds.coco["annotations"][0]["iscrowd"] == int(crowd)
    assert len(ds.target(0)["boxes"]) == kept


@pytest.mark.parametrize("area", [-1.0, float("nan"), float("inf"), "20", None])
def test_area_must_be_a_finite_non_negative_number(tmp_path, area):
    ann, _ = with_annotation(tmp_path, area=area)
    with pytest.raises(DatasetError) as e:
        load_coco_json(ann)
    assert ann in str(e.value) and "area must be a finite number >= 0" in str(e.value)


@pytest.mark.parametrize("name,problem", [("/etc/passwd", "absolute"), ("../a.png", "outside"),
                                          ("sub/../../a.png", "outside"), ("..", "outside")])
def test_file_names_outside_the_image_folder_are_refused(tmp_path, name, problem):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 12)).save(tmp_path / "a.png")   # a real file just outside img_dir
    ann, img_dir = write_dataset(tmp_path, images=[{"id": 1, "file_name": name, "width": 16,
                                                    "height": 12}], annotations=[])
    with pytest.raises(DatasetError) as e:
        CocoDetection("x", ann, img_dir)
    assert ann in str(e.value) and repr(name) in str(e.value) and problem in str(e.value)


def test_file_names_in_subfolders_are_fine(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 12)).save(tmp_path / "images" / "sub" / "b.png")
    ann, img_dir = write_dataset(tmp_path, images=[
        {"id": 1, "file_name": "sub/../a.png", "width": 16, "height": 12},
        {"id": 2, "file_name": "sub/b.png", "width": 16, "height": 12}])
    ds = CocoDetection("x", ann, img_dir, verify_images=True)
    assert [ds[i][1]["image_id"] for i in range(2)] == [1, 2]


@pytest.mark.parametrize("bbox", [[3, 3, 0, 4], [3, 3, 5, 0], [16.5, 3, 0.3, 4], [3, 12.2, 4, 0.5]])
def test_zero_size_box_is_skipped_with_a_warning(tmp_path, bbox):
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 4]}
    empty = {"id": 2, "image_id": 1, "category_id": 1, "bbox": bbox}
    ann, img_dir = write_dataset(tmp_path, annotations=[good, empty])
    with pytest.warns(DatasetWarning) as rec:
        ds = CocoDetection("x", ann, img_dir)
    msg = str(rec[0].message)
    assert ann in msg and "zero width or height" in msg and "ids [2]" in msg
    assert [a["id"] for a in ds.coco["annotations"]] == [1]
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in ds.coco["annotations"])
    assert len(ds.target(0)["boxes"]) == 1


def test_valid_file_gives_no_warning(tmp_path):
    ann, img_dir = write_dataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection("x", ann, img_dir)


# ---------------------------------------------------------------- at the CLI

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_reliability_train import trainer
    root = tmp_path_factory.mktemp("cli_data")
    tr = trainer(str(root / "synthetic"), root / "run")
    tr.train_step()
    return tr.save(str(root / "ckpt.npz"))


def test_cli_reports_bad_coco_files_and_images_without_traceback(checkpoint, tmp_path, capsys):
    from damex.cli import main
    bad_json = tmp_path / "json"
    bad_json.mkdir()
    ann, img_dir = write_dataset(bad_json, images=[{"id": 1, "file_name": None, "width": 16,
                                                    "height": 12}], annotations=[])
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    ann2, img_dir2 = write_dataset(bomb, categories=[{"id": 1, "name": "circle"}])   # a model class
    _png_claiming_size(os.path.join(img_dir2, "a.png"), 100_000, 100_000)
    for a, d, culprit, problem in [(ann, img_dir, ann, "file_name None"),
                                   (ann2, img_dir2, os.path.join(img_dir2, "a.png"), "decompression bomb")]:
        assert main(["eval", checkpoint, "--dataset", f"x={a}:{d}", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"damex eval: error: {culprit}: " in err and problem in err and "Traceback" not in err
