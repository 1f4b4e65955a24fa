"""ResNet backbones built as torchvision builds them, giving multi-scale features.

The module names, shapes and strides are torchvision's (``conv1``, ``bn1``,
``maxpool``, ``layer1.0.conv1``, ..., ``layerN.0.downsample.0/1``; a 7x7/2 stem
convolution, a 3x3/2 max-pool with padding 1; the stride of a Bottleneck on its
3x3 convolution, "ResNet v1.5"), so a torchvision ``state_dict`` without its
``fc.*`` and ``num_batches_tracked`` entries loads key for key (see
``damex convert --from torchvision-resnet50``).  As in DINO, the features of
``layer2..layer4`` are returned (``return_interm_indices=(1, 2, 3)``, strides
8, 16, 32) and the pretrained networks use FrozenBatchNorm2d (eps 1e-5).

``resnet18/34/50/101()`` are torchvision's architectures; the ``tiny`` preset
of the detector uses a small ResNet (one BasicBlock per stage, narrow,
GroupNorm, trained from scratch) with the same stem.
"""
from .. import functional as F
from .. import nn

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101",
           "ARCHITECTURES"]


def _norm(kind, channels):
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "frozen_bn":
        return nn.FrozenBatchNorm2d(channels, eps=1e-5)
    raise ValueError(f"norm: expected 'group' or 'frozen_bn', got {kind!r}")


def _downsample(cin, cout, stride, norm):
    """The shortcut's 1x1 conv + norm where the block changes shape, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))


def _residual(out, x, downsample):
    return F.relu(out + (x if downsample is None else downsample(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the stride on the first), as torchvision's BasicBlock."""
    expansion = 1

    def __init__(self, cin, width, stride, norm):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.downsample = _downsample(cin, cout, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _residual(out, x, self.downsample)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (with the stride, v1.5) -> 1x1 x4, as torchvision's Bottleneck."""
    expansion = 4

    def __init__(self, cin, width, stride, norm):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = _norm(norm, cout)
        self.downsample = _downsample(cin, cout, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return _residual(out, x, self.downsample)


class ResNet(nn.Module):
    """A ResNet returning the outputs of the stages in ``return_interm_indices``.

    Parameters
    ----------
    depths : sequence of 4 int
        Blocks per stage (``layer1..layer4``).
    widths : sequence of 4 int
        Block width per stage (output channels are width * expansion).
    block : {"basic", "bottleneck"}
    stem_width : int
        Output channels of the 7x7/2 stem convolution ``conv1``.
    norm : {"frozen_bn", "group"}
    return_interm_indices : sequence of int
        Stage indices (0..3) whose outputs are returned; strides 4, 8, 16, 32.

    ``forward(x[B, 3, H, W])`` returns a list of ``[B, num_channels[i], H / strides[i],
    W / strides[i]]`` maps (sizes rounded as the convolutions round them).
    """

    def __init__(self, depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), block="basic",
                 stem_width=16, norm="group", return_interm_indices=(1, 2, 3)):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block: expected 'basic' or 'bottleneck', got {block!r}")
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"depths, widths: expected 4 stages each, got {depths}, {widths}")
        idx = tuple(int(i) for i in return_interm_indices)
        if not idx or any(i not in range(4) for i in idx) or list(idx) != sorted(set(idx)):
            raise ValueError(f"return_interm_indices: expected increasing stage indices in 0..3, "
                             f"got {return_interm_indices}")
        Block = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(norm, stem_width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(Block(cin, width, 2 if (j == 0 and i > 0) else 1, norm))
                cin = width * Block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.return_interm_indices = idx
        self.strides = tuple(4 * 2 ** i for i in idx)
        self.num_channels = tuple(widths[i] * Block.expansion for i in idx)

    def set_trainable_stages(self, stages):
        """Let only the parameters of ``stages`` train (``requires_grad``); the others are frozen.

        Stage 0 is the stem (``conv1``, ``bn1``), stages 1..4 are ``layer1..layer4``.
        DINO's rule (models/dino/backbone.py) is ``(2, 3, 4)``: every parameter whose name
        has no ``layer2``/``layer3``/``layer4`` is frozen.  Returns the frozen names.
        """
        stages = tuple(int(s) for s in stages)
        if any(s not in range(5) for s in stages):
            raise ValueError(f"trainable stages: expected numbers in 0..4 (0 = the stem conv1/bn1, "
                             f"1..4 = layer1..layer4), got {list(stages)}")
        frozen = []
        for name, p in self.named_parameters():
            stage = int(name[len("layer")]) if name.startswith("layer") else 0
            p.requires_grad = stage in stages
            if not p.requires_grad:
                frozen.append(name)
        return frozen

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.return_interm_indices:
                outs.append(x)
            if i == self.return_interm_indices[-1]:
                break
        return outs


# torchvision's architectures: (block, blocks per stage)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def _resnet(arch, norm, return_interm_indices):
    block, depths = ARCHITECTURES[arch]
    return ResNet(depths, (64, 128, 256, 512), block, 64, norm, return_interm_indices)


def resnet18(norm="frozen_bn", return_interm_indices=(1, 2, 3)):
    """torchvision's ResNet-18 (BasicBlocks 2, 2, 2, 2) without its classifier."""
    return _resnet("resnet18", norm, return_interm_indices)


def resnet34(norm="frozen_bn", return_interm_indices=(1, 2, 3)):
    """torchvision's ResNet-34 (BasicBlocks 3, 4, 6, 3) without its classifier."""
    return _resnet("resnet34", norm, return_interm_indices)


def resnet50(norm="frozen_bn", return_interm_indices=(1, 2, 3)):
    """torchvision's ResNet-50 (Bottlenecks 3, 4, 6, 3, v1.5) without its classifier."""
    return _resnet("resnet50", norm, return_interm_indices)


def resnet101(norm="frozen_bn", return_interm_indices=(1, 2, 3)):
    """torchvision's ResNet-101 (Bottlenecks 3, 4, 23, 3, v1.5) without its classifier."""
    return _resnet("resnet101", norm, return_interm_indices)
