"""WideResNet-D-W (Zagoruyko & Komodakis, *Wide Residual Networks*, BMVC 2016), pre-activation.

The architecture of the robust-training literature's CIFAR nets: WRN-34-10 (Madry et al.'s and
TRADES's CIFAR-10 model) and WRN-28-10 (most RobustBench CIFAR entries). For depth D and width W,
n = (D − 4) / 6 blocks per group:

    conv3×3 (C → 16)
    group 1: n blocks, 16·W channels, stride 1
    group 2: n blocks, 32·W channels, stride 2 (first block)
    group 3: n blocks, 64·W channels, stride 2 (first block)
    BatchNorm, ReLU, global average pool, linear (64·W → K)

Each block is pre-activation (He et al. 2016): y = conv(ReLU(BN(conv(ReLU(BN(x)))))) + s(x), where
s is the identity when shape is kept and a 1×1 strided conv of ReLU(BN(x)) when it changes. With
K = 10: WRN-34-10 has 46,160,474 parameters, WRN-28-10 36,479,194.

Inputs (B, C, H, W) in [0, 1] are normalised inside with the training set's per-channel mean and
std, as for every zoo net; global average pooling makes any H, W ≥ 1 valid (32×32 gives the usual
8×8 final map).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.errors import ConfigError
from robustopt.models.normalize import Normalize

NAME = re.compile(r"^wrn-(\d+)-(\d+)$")


class WideBlock(nn.Module):
    """Pre-activation residual block with two 3×3 convs and optional dropout between them."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        # A projection only where the shape changes; it reads the activated input, as the residual branch does.
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + skip


class WideResNet(nn.Module):
    """WRN-depth-width. (B, C, H, W) in [0, 1] -> logits (B, num_classes).

    Args:
        mean, std: per-channel statistics of the training data (pixel units), applied inside.
        depth: 6n + 4 (28, 34, 10, …). width: the widening factor W (10 in the robustness literature).
        num_classes: K. in_channels: C. dropout: between the two convs of each block (0 in TRADES/Madry).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        depth: int = 34,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ConfigError(f"WideResNet depth must be 6n+4 >= 10 (10, 16, 22, 28, 34, ...), width >= 1; got {depth}-{width}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for group, stride in enumerate((1, 2, 2)):
            cin, cout = channels[group], channels[group + 1]
            blocks += [WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout) for i in range(n)]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels[3])
        self.linear = nn.Linear(channels[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for the ReLU convs (fan_out, as the WRN authors), unit BatchNorm, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


def parse_name(name: str) -> tuple[int, int] | None:
    """``"wrn-34-10"`` -> (34, 10); None for any other name."""
    m = NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None
