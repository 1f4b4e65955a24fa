"""damex.weights (the restricted .pth reader, safetensors with metadata, npz), damex.convert,
`damex convert`, load_pretrained and the model.backbone_weights / model.pretrained keys."""
import argparse
import collections
import os
import types
import zipfile

import numpy as np
import pytest

from damex import cli, convert, weights
from damex.engine.train import build_model
from damex.models import backbone
from damex.models.dino import DINO, preset
from helpers import torch_or_skip


def _tiny(**kw):
    return preset("tiny", routing="dense", **kw)


# --------------------------------------------------------------- reading .pth

def test_pth_tensors_dtypes_views_and_containers(tmp_path):
    torch = torch_or_skip()
    base = torch.randn(4, 6)
    sd = collections.OrderedDict(
        w=torch.randn(2, 3), ids=torch.arange(5), view=base[:, 1:4], t=base.t(),
        half=torch.randn(3).half(), bf16=torch.randn(3).bfloat16(), flag=torch.tensor(True),
        scalar=torch.tensor(2.5, dtype=torch.float64), empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.ones(2)))
    ckpt = {"model": sd, "args": argparse.Namespace(lr=1e-4, backbone="resnet50"), "epoch": 11,
            "tags": {"a", "b"}, "blob": b"\x00\xff", "shared": [sd["w"], sd["w"]]}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    obj = weights.read_checkpoint(tmp_path / "ckpt.pth")
    assert obj["epoch"] == 11 and obj["tags"] == {"a", "b"} and obj["blob"] == b"\x00\xff"
    assert isinstance(obj["args"], weights.InertNamespace)
    assert obj["args"].lr == 1e-4 and obj["args"].fields["backbone"] == "resnet50"
    for k, v in sd.items():
        ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        got = obj["model"][k]
        assert got.dtype == ref.dtype and got.shape == ref.shape, k
        np.testing.assert_array_equal(got, ref, err_msg=k)
        assert got.flags.c_contiguous and got.flags.writeable
    state = weights.read(tmp_path / "ckpt.pth")        # the "model" entry, flat
    assert list(state) == list(sd)


def test_pth_with_another_global_is_refused_unexecuted(tmp_path):
    torch = torch_or_skip()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": Evil()}, path)
    with pytest.raises(weights.WeightsError, match="refusing to unpickle the global") as e:
        weights.read(path)
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert not marker.exists()
    with pytest.raises(ValueError):
        convert.convert(path, tmp_path / "out.safetensors", "torchvision-resnet18")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("fn,name", [(eval, "eval"), (exec, "exec"), (getattr, "getattr")])
def test_pth_with_builtins_is_refused(tmp_path, fn, name):
    torch = torch_or_skip()

    class Evil:
        def __reduce__(self):
            return (fn, ("1",) if fn is not getattr else (1, "real"))

    torch.save({"x": Evil()}, tmp_path / "e.pth")
    with pytest.raises(weights.WeightsError, match=rf"global __builtin__\.{name}"):
        weights.read_checkpoint(tmp_path / "e.pth")


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    torch = torch_or_skip()
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    for i, cut in enumerate((len(data) // 2, 100, 10)):
        bad = tmp_path / f"trunc{i}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(weights.WeightsError, match=str(bad)):
            weights.read(bad)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF                       # inside the tensor record: CRC fails
    (tmp_path / "flip.pth").write_bytes(bytes(flipped))
    with pytest.raises(weights.WeightsError, match="flip.pth"):
        weights.read(tmp_path / "flip.pth")
    # a well-formed zip whose tensor record is too short
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(short, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, zin.read(n)[:100] if n.endswith("data/0") else zin.read(n))
    with pytest.raises(weights.WeightsError, match="short.pth.*bytes"):
        weights.read(short)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(weights.WeightsError, match="junk.pth"):
        weights.read(tmp_path / "junk.pth")
    for ext, payload in ((".safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), (".npz", b"PK\x03")):
        p = tmp_path / f"bad{ext}"
        p.write_bytes(payload)
        with pytest.raises(weights.WeightsError, match=f"bad{ext}"):
            weights.read(p)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        weights.read(tmp_path / "nothere.pth")
    with pytest.raises(weights.WeightsError, match="unknown weights format"):
        weights.read(_touch(tmp_path / "w.h5"))


def _touch(p):
    p.write_bytes(b"")
    return p


def test_format_from_the_content_for_other_suffixes(tmp_path):
    torch = torch_or_skip()
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint.pth-rank1")  # Tutel's ranks
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.data")
    weights.write(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    os.replace(tmp_path / "a.safetensors", tmp_path / "a.weights")
    np.savez(tmp_path / "b.npz", w=np.ones(2))
    os.replace(tmp_path / "b.npz", tmp_path / "b.arrays")
    for name in ("checkpoint.pth-rank1", "weights.data", "a.weights", "b.arrays"):
        np.testing.assert_array_equal(weights.read(tmp_path / name)["w"], np.ones(2), err_msg=name)


def test_legacy_format_gets_a_clear_error(tmp_path):
    torch = torch_or_skip()
    p = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(weights.WeightsError, match="legacy.*old.pth|old.pth.*legacy"):
        weights.read(p)


def test_npz_is_read_without_pickle(tmp_path):
    np.savez(tmp_path / "a.npz", w=np.arange(3.0))
    assert list(weights.read(tmp_path / "a.npz")) == ["w"]
    np.savez(tmp_path / "obj.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(weights.WeightsError, match="obj.npz"):
        weights.read(tmp_path / "obj.npz")


# ----------------------------------------------------------------- safetensors

def test_safetensors_round_trip_with_metadata(tmp_path):
    model = DINO(_tiny())
    meta = {"config": {"d_model": 64, "backbone_depths": [1, 1, 1, 1]},
            "label_space": ["cat", "dog"], "note": "plain text"}
    path = tmp_path / "m.safetensors"
    assert weights.write(path, model, meta) == str(path)
    back = weights.read(path)
    ref = model.state_dict()
    assert list(sorted(back)) == list(sorted(ref))
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])
    got = weights.read_metadata(path)
    assert got == meta
    assert os.listdir(tmp_path) == ["m.safetensors"]       # no temporary file left


def test_write_is_atomic_and_checks_its_input(tmp_path):
    path = tmp_path / "w.safetensors"
    weights.write(path, {"a": np.ones(2, np.float32)})
    with pytest.raises(TypeError, match="dtype"):
        weights.write(path, {"a": np.zeros(2), "b": np.array(["x"], dtype=object)})
    np.testing.assert_array_equal(weights.read(path)["a"], np.ones(2))   # old file intact
    assert os.listdir(tmp_path) == ["w.safetensors"]
    with pytest.raises(ValueError, match="safetensors"):
        weights.write(tmp_path / "w.npz", {"a": np.ones(2)})


# ------------------------------------------------------------ load_pretrained

def test_load_pretrained_reports_a_num_classes_mismatch(tmp_path, capsys):
    src = DINO(_tiny(num_classes=10, seed=1))
    path = tmp_path / "src.safetensors"
    weights.write(path, src, {"config": {"num_classes": 10}})
    dst = DINO(_tiny(num_classes=7, seed=2))
    before = dst.state_dict()
    rep = weights.load_pretrained(dst, path, skip=())
    out = capsys.readouterr().out
    mism = {k for k, _, _ in rep.mismatched}
    assert "label_enc.weight" in mism and "enc_class_embed.weight" in mism
    assert any("class_embed" in k and not k.startswith("enc") for k in mism)
    assert "shape mismatch" in out and str(path) in out
    after = dst.state_dict()
    for k in mism:
        np.testing.assert_array_equal(after[k], before[k])     # left as initialised
    for k in rep.loaded:
        np.testing.assert_array_equal(after[k], src.state_dict()[k])
    assert not rep.missing and not rep.unexpected
    # the default skip leaves the class-sized parts out without calling them mismatches
    rep2 = weights.load_pretrained(DINO(_tiny(num_classes=7)), path, verbose=False)
    assert not rep2.mismatched and "label_enc.weight" in rep2.skipped
    assert any("enc_class_embed" in k for k in rep2.skipped)
    assert len(rep2.loaded) == len(rep.loaded)
    assert rep2.as_dict()["skipped"] == rep2.skipped


def test_load_pretrained_prefix_missing_and_unexpected():
    m = backbone.resnet18()
    state = {f"backbone.{k}": v + 1 for k, v in m.state_dict().items()}
    state["backbone.extra"] = np.zeros(1, np.float32)
    del state["backbone.conv1.weight"]
    state["head.w"] = np.zeros(1, np.float32)
    rep = weights.load_pretrained(m, state, prefix="backbone.", verbose=False)
    assert rep.missing == ["conv1.weight"] and set(rep.unexpected) == {"head.w", "extra"}
    np.testing.assert_array_equal(m.state_dict()["bn1.bias"], state["backbone.bn1.bias"])


def test_config_keys_backbone_weights_and_pretrained(tmp_path, capsys):
    donor = DINO(_tiny(seed=3))
    bb = tmp_path / "bb.safetensors"
    weights.write(bb, donor.backbone)
    full = tmp_path / "full.safetensors"
    weights.write(full, donor)
    cfg = types.SimpleNamespace(model=_tiny(backbone_weights=str(bb), seed=4))
    m = build_model(cfg, 10, 2)
    out = capsys.readouterr().out
    assert "(backbone)" in out and "loaded" in out
    for k, v in donor.backbone.state_dict().items():
        np.testing.assert_array_equal(m.backbone.state_dict()[k], v)
    assert not np.array_equal(m.state_dict()["enc_output.weight"], donor.state_dict()["enc_output.weight"])
    # a detector's file (keys under backbone.) also works as backbone_weights
    m2 = build_model(types.SimpleNamespace(model=_tiny(backbone_weights=str(full), seed=5)), 10, 2)
    np.testing.assert_array_equal(m2.backbone.conv1.weight.data, donor.backbone.conv1.weight.data)
    m3 = build_model(types.SimpleNamespace(model=_tiny(pretrained=str(full), seed=6)), 10, 2)
    np.testing.assert_array_equal(m3.state_dict()["enc_output.weight"],
                                  donor.state_dict()["enc_output.weight"])
    assert "skipped" in capsys.readouterr().out
    m4 = build_model(types.SimpleNamespace(model=_tiny(pretrained=str(full), seed=6)), 10, 2,
                     load_weights=False)
    assert not np.array_equal(m4.state_dict()["enc_output.weight"],
                              donor.state_dict()["enc_output.weight"])


def test_a_pretrained_file_that_fits_nothing_is_named_by_its_key(tmp_path, capsys):
    """model.pretrained alone: the error names model.pretrained (not backbone_weights)."""
    other = tmp_path / "other.safetensors"
    weights.write(other, {"something.else": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"model\.pretrained: nothing in .*other\.safetensors fits"):
        build_model(types.SimpleNamespace(model=_tiny(pretrained=str(other))), 10, 2)
    with pytest.raises(ValueError, match=r"model\.backbone_weights: nothing"):
        build_model(types.SimpleNamespace(model=_tiny(backbone_weights=str(other))), 10, 2)


# ----------------------------------------------------------------- convert

def test_cli_convert_torchvision_resnet18(tmp_path, capsys):
    torch = torch_or_skip()
    from damex.testing.resnet_twin import random_resnet
    tm = random_resnet("resnet18", seed=8)
    sd = {f"module.{k}": v for k, v in tm.state_dict().items()}   # DataParallel prefix
    torch.save(sd, tmp_path / "r18.pth")
    dst = tmp_path / "r18.safetensors"
    assert cli.main(["convert", str(tmp_path / "r18.pth"), str(dst), "--from",
                     "torchvision-resnet18"]) == 0
    n = sum(v.numel() for k, v in tm.state_dict().items()
            if not (k.startswith("fc.") or k.endswith("num_batches_tracked")))
    assert n == 11_689_512 - 513_000 + 2 * 4800      # parameters minus fc, plus BN statistics
    assert f"100 arrays, {n:,} values" in capsys.readouterr().out
    state = weights.read(dst)
    assert sorted(state) == sorted(backbone.resnet18().state_dict())
    np.testing.assert_array_equal(state["layer2.0.downsample.1.running_var"],
                                  tm.layer2[0].downsample[1].running_var.numpy())
    assert weights.read_metadata(dst)["converted_from"] == "r18.pth"


def test_convert_refuses_the_wrong_architecture(tmp_path, capsys):
    torch = torch_or_skip()
    from damex.testing.resnet_twin import TorchResNet
    torch.save(TorchResNet("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet50 state dict"):
        convert.convert(tmp_path / "r18.pth", tmp_path / "o.safetensors", "torchvision-resnet50")
    assert cli.main(["convert", str(tmp_path / "r18.pth"), str(tmp_path / "o.safetensors"),
                     "--from", "torchvision-resnet34"]) == 2
    assert "not a torchvision resnet34" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--from"):
        convert.convert(tmp_path / "r18.pth", tmp_path / "o.safetensors", "caffe")
    assert not (tmp_path / "o.safetensors").exists()
