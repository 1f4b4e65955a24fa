"""A ResNet backbone (BasicBlock or Bottleneck stages) giving multi-scale features.

``tiny`` trains from scratch on a CPU in minutes (GroupNorm, BasicBlocks);
``resnet50`` has ResNet-50's stages (3, 4, 6, 3 bottlenecks, widths 256..2048,
FrozenBatchNorm as DINO uses with pretrained weights).  damex has no max-pool
kernel: the stem's 3x3/2 max-pool is a 3x3/2 convolution, which keeps the
strides (4, 8, 16, 32) of the stages.
"""
from .. import functional as F
from .. import nn


def _norm(kind, channels):
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "frozen_bn":
        return nn.FrozenBatchNorm2d(channels)
    raise ValueError(f"norm: expected 'group' or 'frozen_bn', got {kind!r}")


def _downsample(cin, cout, stride, norm):
    """The shortcut's 1x1 conv + norm where the block changes shape, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))


def _residual(out, x, downsample):
    return F.relu(out + (x if downsample is None else downsample(x)))


class BasicBlock(nn.Module):
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
    """ResNet returning the feature maps of the stages in ``return_stages``.

    Parameters
    ----------
    depths : sequence of int
        Blocks per stage (4 stages).
    widths : sequence of int
        Block width per stage (output channels are width * expansion).
    block : {"basic", "bottleneck"}
    stem_width : int
    norm : {"group", "frozen_bn"}
    return_stages : sequence of int
        Stage indices (0..3) whose outputs are returned, with strides 4, 8, 16, 32.
    """

    def __init__(self, depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), block="basic",
                 stem_width=16, norm="group", return_stages=(1, 2, 3)):
        super().__init__()
        Block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.stem_conv = nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False)
        self.stem_norm = _norm(norm, stem_width)
        self.stem_pool = nn.Conv2d(stem_width, stem_width, 3, stride=2, padding=1, bias=False)
        stages, cin = [], stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(Block(cin, width, 2 if (j == 0 and i > 0) else 1, norm))
                cin = width * Block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.return_stages = tuple(return_stages)
        self.strides = tuple(4 * 2 ** i for i in self.return_stages)
        self.num_channels = tuple(widths[i] * Block.expansion for i in self.return_stages)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem_conv(x)))
        x = self.stem_pool(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_stages:
                outs.append(x)
        return outs
