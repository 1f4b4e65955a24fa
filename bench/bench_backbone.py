"""Benchmark: torchvision-layout ResNet-50 forward (batch 1, 512x512) and the stem max-pool,
damex against torch on the same cores, with the same weights.

    python bench/bench_backbone.py [--quick] [--size 512]

Timing as bench/bench_nn.py (interleaved repeats, best of 1 and 2 threads per side,
ratio = torch / damex, > 1: damex faster).  Also prints the features' max error relative
to torch's largest value.  The torch model is the twin damex.testing.resnet_twin.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import torch  # noqa: E402
from bench_nn import line, race  # noqa: E402

from damex import ops  # noqa: E402
from damex.autograd import no_grad  # noqa: E402
from damex.models.backbone import resnet50  # noqa: E402
from damex.testing.resnet_twin import random_resnet  # noqa: E402


def resnet50_line(size, repeats):
    """Print the features' error and the ResNet-50 forward line (damex vs torch, same weights)."""
    tm = random_resnet("resnet50", seed=0)
    dm = resnet50()
    dm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()
                        if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))})
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    xt = torch.tensor(x)

    def d_fwd():
        with no_grad():
            return [f.data for f in dm(x)]

    def t_fwd():
        with torch.no_grad():
            return [f.numpy() for f in tm.features(xt)]

    errs = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(d_fwd(), t_fwd())]
    print(f"resnet50 layer2..4 max |damex - torch| / max |torch|: "
          + ", ".join(f"{e:.1e}" for e in errs), flush=True)
    line(f"resnet50 fwd B=1 {size}x{size} (layer2..4)", race({"damex": d_fwd, "torch": t_fwd}, repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    repeats = 2 if args.quick else 4
    resnet50_line(args.size, repeats)
    s = args.size // 2
    p = np.random.default_rng(1).normal(size=(1, 64, s, s)).astype(np.float32)
    pt = torch.tensor(p)
    line(f"max-pool 3x3/2 p1 fwd 1x64x{s}x{s}", race({
        "damex": lambda: ops.maxpool2d_forward(p, 3, 2, 1),
        "torch": lambda: torch.nn.functional.max_pool2d(pt, 3, 2, 1, return_indices=True)},
        repeats * 3))


if __name__ == "__main__":
    main()
