"""ResNet-32 for CIFAR (He et al. 2016, 3 stages x 5 basic blocks, 16/32/64 channels)
with every BatchNorm replaced by GroupNorm, as in the paper's CIFAR experiments.

Choices beyond the paper (docs/method.md): GroupNorm with 8 groups at every width
(16, 32, 64 channels: 2, 4, 8 channels per group);
convolutions have no bias (GroupNorm's beta plays that role); the shortcut
between stages is the parameter-free option A (stride-2 subsampling and zero
channel padding) of the original CIFAR ResNet.
"""
import torch.nn.functional as F
from torch import nn

GN_GROUPS = 8


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GN_GROUPS, c), c)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = _gn(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        sc = x
        if self.stride != 1 or self.pad:
            sc = x[:, :, ::self.stride, ::self.stride]
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + sc)


class ResNetGN(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, num_classes_a: int = 5, num_classes_b: int = 5,
                 widths=(16, 32, 64), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.gn1 = _gn(widths[0])
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, w, stride))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.rep_dim = widths[-1]
        self.head_a = nn.Linear(self.rep_dim, num_classes_a)
        self.head_b = nn.Linear(self.rep_dim, num_classes_b)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x, head: str = "a"):
        z = self.features(x)
        return self.head_a(z) if head == "a" else self.head_b(z)


def resnet32_gn(num_classes_a: int = 5, num_classes_b: int = 5, **kw) -> ResNetGN:
    """ResNet-32: 1 + 3*5*2 conv layers + the heads."""
    return ResNetGN(5, num_classes_a, num_classes_b, **kw)
