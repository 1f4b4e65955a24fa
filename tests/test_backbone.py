"""The max-pool kernel (finite differences, torch parity with ties, bad input) and the
torchvision-layout ResNets (names, shapes, features against a torch twin whose .pth is read
and converted by damex with torch imports blocked)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from damex import _C, ops
from damex import functional as F
from damex import nn
from damex.autograd import Tensor
from damex.models import backbone
from helpers import assert_close, numeric_grad, torch_or_skip, unchanged


POOLS = [  # (x shape, kernel, stride, padding)
    ((2, 3, 9, 8), 3, 2, 1),      # the ResNet stem pool
    ((1, 2, 5, 5), 2, 1, 0),
    ((1, 1, 7, 6), (3, 2), (2, 1), (1, 1)),
    ((2, 2, 4, 4), 2, None, 0),   # stride defaults to the kernel
    ((1, 1, 1, 1), 1, 1, 0),
    ((1, 2, 6, 5), 5, 3, 2),
]


# ------------------------------------------------------------------- max-pool

@pytest.mark.parametrize("shape,k,s,p", POOLS)
def test_maxpool_central_differences(shape, k, s, p):
    rng = np.random.default_rng(1)
    x = (rng.permutation(int(np.prod(shape))) * 0.01).reshape(shape)   # no ties, 0.01 apart
    y, idx = ops.maxpool2d_forward(x.astype(np.float32), k, s, p)
    g = rng.normal(size=y.shape)
    dx = ops.maxpool2d_backward(g.astype(np.float32), idx, shape)

    def f(xv):
        return float((ops.maxpool2d_forward(xv.astype(np.float32), k, s, p)[0].astype(np.float64)
                      * g).sum())
    assert_close(dx, numeric_grad(f, x, eps=1e-3), atol=1e-3, rtol=1e-3, name="dx")


def _torch_pool(torch, x, g, k, s, p):
    xt = torch.tensor(x, requires_grad=True)
    yt, it = torch.nn.functional.max_pool2d(xt, k, s, p, return_indices=True)
    yt.backward(torch.tensor(g))
    return yt.detach().numpy(), it.numpy(), xt.grad.numpy()


@pytest.mark.parametrize("shape,k,s,p", POOLS)
@pytest.mark.parametrize("kind", ["random", "constant", "repeated", "neg_inf"])
def test_maxpool_torch_parity_with_ties(shape, k, s, p, kind):
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    if kind == "random":
        x = rng.normal(size=shape)
    elif kind == "constant":
        x = np.full(shape, -0.5)
    elif kind == "repeated":
        x = rng.integers(0, 3, shape).astype(float)
    else:
        x = np.where(rng.random(shape) < 0.5, -np.inf, rng.integers(0, 2, shape))
    x = x.astype(np.float32)
    check = unchanged(x)
    y, idx = ops.maxpool2d_forward(x, k, s, p)
    g = rng.normal(size=y.shape).astype(np.float32)
    dx = ops.maxpool2d_backward(g, idx, x.shape)
    check()
    ty, tidx, tdx = _torch_pool(torch, x, g, k, s, p)
    np.testing.assert_array_equal(y, ty)
    np.testing.assert_array_equal(idx, tidx)    # the same element wins every tie
    assert_close(dx, tdx, atol=1e-6, rtol=1e-6, name="dx")


def test_maxpool_nan_propagates_like_torch():
    torch = torch_or_skip()
    x = np.array([[[[1, np.nan, 3, np.nan], [0, 5, np.nan, 2]]]], np.float32)
    y, idx = ops.maxpool2d_forward(x, 2, 1, 0)
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), 2, 1, 0, return_indices=True)
    np.testing.assert_array_equal(y, ty.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())


def test_maxpool_on_the_tape_and_as_a_module():
    rng = np.random.default_rng(3)
    x = Tensor(rng.normal(size=(2, 3, 8, 8)).astype(np.float32), requires_grad=True)
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    y = pool(x)
    assert y.shape == (2, 3, 4, 4) and "kernel_size=3" in repr(pool)
    g = rng.normal(size=y.shape).astype(np.float32)
    (y * Tensor(g)).sum().backward()
    _, idx = ops.maxpool2d_forward(x.data, 3, 2, 1)
    np.testing.assert_array_equal(x.grad, ops.maxpool2d_backward(g, idx, x.shape))
    np.testing.assert_array_equal(F.max_pool2d(x, 3, 2, 1).data, y.data)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.maxpool2d_forward(np.zeros((3, 4, 4), np.float32), 2), ValueError, "4 dimensions"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 4, 4), np.int64), 2), TypeError, "floating"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 4, 4), np.float32), 3, 1, 2), ValueError,
     "padding"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 2, 2), np.float32), 5, 1, 1), ValueError,
     "smaller than the kernel"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 4, 4), np.float32), 0), ValueError,
     "kernel_size"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 4, 4), np.float32), 2, 0), ValueError, "stride"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 4, 4), np.float32), (2, 2, 2)), ValueError,
     "pair"),
    (lambda: ops.maxpool2d_forward(np.zeros((1, 1, 0, 4), np.float32), 1), ValueError, "H, W > 0"),
    (lambda: ops.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32),
                                    np.full((1, 1, 2, 2), 16), (1, 1, 4, 4)), ValueError,
     "index out of range"),
    (lambda: ops.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32),
                                    np.full((1, 1, 2, 2), -1), (1, 1, 4, 4)), ValueError,
     "index out of range"),
    (lambda: ops.maxpool2d_backward(np.zeros((1, 2, 2, 2), np.float32),
                                    np.zeros((1, 2, 2, 2), np.int64), (1, 1, 4, 4)), ValueError,
     "match input_shape"),
    (lambda: ops.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32),
                                    np.zeros((1, 1, 2, 3), np.int64), (1, 1, 4, 4)), ValueError,
     "idx: expected shape"),
    (lambda: ops.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32),
                                    np.zeros((1, 1, 2, 2), np.float32), (1, 1, 4, 4)), TypeError,
     "integer"),
])
def test_maxpool_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_maxpool_binding_checks_buffers():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="elements"):   # y too small for 4x4 -> 2x2
        _C.maxpool2d_forward(np.zeros(3, np.float32), np.zeros(4, np.int64), x, 1, 1, 4, 4,
                             2, 2, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="invalid"):
        _C.maxpool2d_forward(np.zeros(4, np.float32), np.zeros(4, np.int64), x, 1, 1, 4, 4,
                             2, 2, 2, 2, 3, 3)
    with pytest.raises(TypeError, match="int64"):
        _C.maxpool2d_forward(np.zeros(4, np.float32), np.zeros(4, np.int32), x, 1, 1, 4, 4,
                             2, 2, 2, 2, 0, 0)


# ------------------------------------------------------------------- ResNets

def _expected_keys(torch_model):
    return [k for k in torch_model.state_dict()
            if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_resnet_names_and_shapes_are_torchvision(arch):
    torch_or_skip()
    from damex.testing.resnet_twin import TorchResNet
    tm = TorchResNet(arch)
    ours = getattr(backbone, arch)().state_dict()
    assert list(ours) == _expected_keys(tm)
    for k, v in ours.items():
        assert v.shape == tuple(tm.state_dict()[k].shape), k
    m = getattr(backbone, arch)()
    assert m.strides == (8, 16, 32)
    assert m.num_channels == ((128, 256, 512) if arch in ("resnet18", "resnet34") else (512, 1024, 2048))
    assert m.bn1.eps == 1e-5 and isinstance(m.maxpool, nn.MaxPool2d)


def test_paper_preset_backbone_is_resnet50():
    from damex.models.dino import PRESETS
    cfg = PRESETS["paper"]
    m = backbone.ResNet(cfg.backbone_depths, cfg.backbone_widths, cfg.backbone_block,
                        cfg.stem_width, cfg.backbone_norm)
    ref = backbone.resnet50().state_dict()
    assert [(k, v.shape) for k, v in m.state_dict().items()] == [(k, v.shape) for k, v in ref.items()]
    assert isinstance(m.layer1[0].bn1, nn.FrozenBatchNorm2d)


def test_resnet_checks_its_arguments():
    with pytest.raises(ValueError, match="return_interm_indices"):
        backbone.ResNet(return_interm_indices=(2, 1))
    with pytest.raises(ValueError, match="block"):
        backbone.ResNet(block="wide")
    with pytest.raises(ValueError, match="norm"):
        backbone.ResNet(norm="batch")


def test_tiny_backbone_has_the_real_stem():
    from damex.models.dino import PRESETS
    cfg = PRESETS["tiny"]
    m = backbone.ResNet(cfg.backbone_depths, cfg.backbone_widths, cfg.backbone_block,
                        cfg.stem_width, cfg.backbone_norm)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == 2 and m.conv1.padding == 3
    feats = m(np.zeros((1, 3, 64, 48), np.float32))
    assert [f.shape[2:] for f in feats] == [(8, 6), (4, 3), (2, 2)]


def test_resnet18_features_match_torch_in_process(tmp_path):
    torch = torch_or_skip()
    from damex.testing.resnet_twin import random_resnet
    from damex import convert, weights
    tm = random_resnet("resnet18", seed=4)
    torch.save(tm.state_dict(), tmp_path / "r18.pth")
    convert.convert(tmp_path / "r18.pth", tmp_path / "r18.safetensors", "torchvision-resnet18")
    m = backbone.resnet18()
    m.load_state_dict(weights.read(tmp_path / "r18.safetensors"))
    x = np.random.default_rng(5).normal(size=(2, 3, 70, 53)).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in tm.features(torch.tensor(x))]
    for name, a, b in zip(("layer2", "layer3", "layer4"), m(x), ref):
        assert_close(a.data, b, atol=1e-4 * np.abs(b).max(), rtol=1e-4, name=name)


SUBPROCESS = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None          # any `import torch` now raises ImportError
    import numpy as np
    from damex import convert, weights
    from damex.models import backbone
    src, dst, xfile, out = sys.argv[1:]
    raw = weights.read(src)
    report = convert.convert(src, dst, "torchvision-resnet50")
    m = backbone.resnet50()
    m.load_state_dict(weights.read(dst))
    feats = m(np.load(xfile))
    np.savez(out, *[f.data for f in feats])
    assert sys.modules["torch"] is None
    print(len(raw), report["arrays"])
""")


def test_resnet50_pth_read_without_torch_matches_torch(tmp_path):
    """torch twin -> torch.save -> .pth -> damex (torch blocked) -> convert -> features."""
    torch = torch_or_skip()
    from damex.testing.resnet_twin import random_resnet
    tm = random_resnet("resnet50", seed=6)
    torch.save(tm.state_dict(), tmp_path / "resnet50.pth")
    x = np.random.default_rng(7).normal(size=(1, 3, 96, 80)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    import damex   # the subprocess imports the damex these tests import (installed or in place)
    home = os.path.dirname(os.path.dirname(damex.__file__))
    env = dict(os.environ, PYTHONPATH=home + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path / "resnet50.pth"),
                          str(tmp_path / "r50.safetensors"), str(tmp_path / "x.npy"),
                          str(tmp_path / "feats.npz")], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    n_raw, n_conv = map(int, res.stdout.split())
    assert n_raw == len(tm.state_dict())                  # fc + num_batches_tracked included
    assert n_conv == len(_expected_keys(tm))              # and dropped by the converter
    with torch.no_grad():
        ref = [t.numpy() for t in tm.features(torch.tensor(x))]
    with np.load(tmp_path / "feats.npz") as z:
        ours = [z[f"arr_{i}"] for i in range(3)]
    for name, a, b in zip(("layer2", "layer3", "layer4"), ours, ref):
        assert a.shape == b.shape, name
        assert_close(a, b, atol=1e-4 * np.abs(b).max(), rtol=1e-4, name=name)
    from damex import weights
    meta = weights.read_metadata(tmp_path / "r50.safetensors")
    assert meta["source"] == "torchvision-resnet50" and meta["arch"] == "resnet50"
    assert json.dumps(meta)   # plain JSON values
