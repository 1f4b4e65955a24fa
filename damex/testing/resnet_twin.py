"""A torchvision-layout ResNet written in torch for the tests and bench/bench_backbone.py
(torchvision is not installed here): torchvision's module names, BatchNorm2d (eps 1e-5),
the stride of a Bottleneck on its 3x3 conv (v1.5), a 7x7/2 stem + 3x3/2 max-pool,
avgpool + fc; random weights including non-trivial batch-norm statistics (imports torch)."""
import torch
from torch import nn

ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
         "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottle(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    def __init__(self, arch="resnet50", num_classes=1000):
        super().__init__()
        kind, depths = ARCHS[arch]
        Block = Basic if kind == "basic" else Bottle
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512))):
            blocks = []
            for j in range(depth):
                stride = 2 if (j == 0 and i > 0) else 1
                ds = None
                if stride != 1 or cin != width * Block.expansion:
                    ds = nn.Sequential(nn.Conv2d(cin, width * Block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(width * Block.expansion))
                blocks.append(Block(cin, width, stride, ds))
                cin = width * Block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x):
        """layer2, layer3, layer4 outputs (DINO's return_interm_indices [1, 2, 3])."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        outs = []
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def random_resnet(arch="resnet50", seed=0):
    """An eval-mode twin with random conv weights and random BN affine + running statistics."""
    torch.manual_seed(seed)
    m = TorchResNet(arch)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.uniform_(0.3, 0.8)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(1000 + n)
    return m.eval()
