"""Classifiers that take float NCHW inputs in [0, 1], normalise inside and return logits.

Because normalisation lives inside the model, every ε in robustopt is in pixel units and
attacks never have to undo a preprocessing step.

* ``paper-mnist``: the authors' MNIST net (Shaham et al., public Torch code): zero-pad to
  32×32, conv5×5·32, ReLU, max-pool 3; conv5×5·64, ReLU, max-pool 2; FC 256→200, ReLU; FC 10.
* ``paper-cifar``: the authors' VGG-style net (13 conv3×3 + BatchNorm + ReLU, dropout
  0.3/0.4, classifier dropout 0.5, FC 512, BatchNorm, FC 10).
* ``resnet18``: pre-activation ResNet-18 (He et al. 2016) for 32×32 inputs.
* ``small-cnn``: the TRADES MNIST net (Zhang et al. 2019), four conv3×3 layers and two FC 200 layers.
* ``mlp``: a small two-layer perceptron, handy for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.errors import ConfigError


class Normalize(nn.Module):
    """(x - mean) / std per channel; x (B, C, H, W) in pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _FoldInputGradConv(torch.autograd.Function):
    """conv2d (stride 1, no padding) whose input gradient is computed by col2im (``F.fold``).

    Why: on CPU, oneDNN's backward-data kernel for a convolution with one input channel is
    very slow (about 15× the forward on paper-mnist's first layer), and the inner
    maximisation needs exactly that gradient. ∇ₓ = fold(Wᵀ · ∇_out) is the same linear map.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            b, o, h, w = grad_out.shape
            cols = torch.matmul(weight.detach().reshape(o, -1).t(), grad_out.reshape(b, o, h * w))  # (B, C·k·k, L)
            gx = F.fold(cols, x.shape[-2:], weight.shape[-2:])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            mask = [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                [weight.shape[0]] if ctx.has_bias else None,
                [1, 1],
                [0, 0],
                [1, 1],
                False,
                [0, 0],
                1,
                mask,
            )
        return gx, gw, gb


class InputConv2d(nn.Conv2d):
    """A plain ``nn.Conv2d`` (same parameters and state dict) with a fast CPU input gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.stride == (1, 1) and self.padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1
        if x.device.type != "cpu" or not plain:
            return super().forward(x)
        return _FoldInputGradConv.apply(x, self.weight, self.bias)


class PaperMNIST(nn.Module):
    """The authors' MNIST net. Input (B, 1, 28, 28) in [0,1] -> logits (B, 10)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        # conv, ReLU, max-pool as the authors wrote it, computed as conv, max-pool, ReLU: ReLU is monotone, so
        # max(relu(z)) = relu(max(z)) and the gradients agree too, but ReLU then runs on maps 9× (4×) smaller.
        # On CPU that cuts the first block's forward + backward by ~40%. Parameter indices are unchanged.
        self.features = nn.Sequential(
            InputConv2d(1, 32, 5),
            nn.MaxPool2d(3, 3),  # 32 -> 28 -> 9
            nn.ReLU(),
            nn.Conv2d(32, 64, 5),
            nn.MaxPool2d(2, 2),  # 9 -> 5 -> 2
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 200), nn.ReLU(), nn.Linear(200, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero-pad in pixel space (a black border), as the authors' 32×32 MNIST.
        pad = (32 - x.shape[-1]) // 2
        x = F.pad(x, (pad, pad, pad, pad))
        return self.classifier(self.features(self.normalize(x)))


_VGG_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class PaperCIFAR(nn.Module):
    """The authors' VGG-BN CIFAR net. Input (B, 3, 32, 32) in [0,1] -> logits (B, 10)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for i, v in enumerate(_VGG_CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            # Dropout between the convs of a block: 0.3 after a block's first conv, 0.4 after the others.
            if i + 1 < len(_VGG_CFG) and _VGG_CFG[i + 1] != "M":
                first_in_block = i == 0 or _VGG_CFG[i - 1] == "M"
                layers.append(nn.Dropout(0.3 if first_in_block else 0.4))
            c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32×32 inputs. (B, C, 32, 32) in [0,1] -> (B, K)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


class SmallCNN(nn.Module):
    """The TRADES MNIST net (Zhang et al. 2019): conv3×3 32, 32, max-pool 2; conv3×3 64, 64, max-pool 2 (all ReLU);
    FC 1024→200, ReLU, dropout 0.5, FC 200→200, ReLU, FC 10. Input (B, 1, 28, 28) in [0,1] -> logits (B, 10)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            InputConv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2, 2),  # 28 -> 26 -> 24 -> 12
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2, 2),  # 12 -> 10 -> 8 -> 4
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class MLP(nn.Module):
    """Two-layer perceptron on flattened inputs; (B, C, H, W) -> (B, K)."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_features: int = 784, hidden: int = 256
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _mlp(mean: Sequence[float], std: Sequence[float], num_classes: int, shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = shape
    return MLP(mean, std, num_classes, in_features=c * h * w)


ModelFactory = Callable[[Sequence[float], Sequence[float], int, tuple[int, int, int]], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "paper-mnist": lambda mean, std, k, shape: PaperMNIST(mean, std, k),
    "small-cnn": lambda mean, std, k, shape: SmallCNN(mean, std, k),
    "paper-cifar": lambda mean, std, k, shape: PaperCIFAR(mean, std, k, in_channels=shape[0]),
    "resnet18": lambda mean, std, k, shape: PreActResNet18(mean, std, k, in_channels=shape[0]),
    "mlp": _mlp,
}

# Input shape each architecture accepts; None means any.
_SHAPES: dict[str, tuple[int, int, int] | None] = {
    "paper-mnist": (1, 28, 28),
    "small-cnn": (1, 28, 28),
    "paper-cifar": None,
    "resnet18": None,
    "mlp": None,
}


def build_model(
    name: str, *, mean: Sequence[float], std: Sequence[float], num_classes: int, input_shape: tuple[int, int, int]
) -> nn.Module:
    """Instantiate a registered architecture for data of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    need = _SHAPES[name]
    if need is not None and tuple(input_shape) != need:
        raise ConfigError(f"model {name!r} expects {need[0]}×{need[1]}×{need[2]} inputs, the data has {input_shape}")
    if name in ("paper-cifar", "resnet18") and tuple(input_shape[1:]) != (32, 32):
        raise ConfigError(f"model {name!r} expects 32×32 inputs, the data has {input_shape[1]}×{input_shape[2]}")
    return MODELS[name](list(mean), list(std), num_classes, tuple(input_shape))


class Normalized(nn.Module):
    """Wrap a model that expects standardised inputs so that it takes pixel-unit inputs.

    ``Normalized(net, mean, std)(x) = net((x − mean) / std)`` per channel, for x (B, C, H, W) in
    [0, 1]. Then every ε robustopt sees is in pixel units, as the attacks and the threat model
    assume. The wrapped model is ``self.model``; its state-dict keys gain the prefix ``model.``.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise ConfigError(f"Normalized: mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if any(float(s) <= 0 for s in std):
            raise ConfigError(f"Normalized: std must be positive, got {list(std)}")
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat feature vectors (B, D): one mean/std for all features, or one per feature
            return self.model((x - self.normalize.mean.view(1, -1)) / self.normalize.std.view(1, -1))
        return self.model(self.normalize(x))
