"""Classifiers that take float inputs in [0, 1], normalise inside and return logits.

Because normalisation lives inside the model, every ε in robustopt is in pixel units and
attacks never have to undo a preprocessing step. Every net takes any number of classes K and
every input shape its architecture allows:

* ``paper-mnist``: the authors' MNIST net (Shaham et al., public Torch code): zero-pad to
  32×32, conv5×5·32, ReLU, max-pool 3; conv5×5·64, ReLU, max-pool 2; FC 256→200, ReLU; FC K.
  Images (C, H, W) with H, W ≤ 32.
* ``paper-cifar``: the authors' VGG-style net (13 conv3×3 + BatchNorm + ReLU, dropout
  0.3/0.4, classifier dropout 0.5, FC 512, BatchNorm, FC K). Images with H, W ≥ 32 (larger
  ones are average-pooled after the last block).
* ``resnet18``: pre-activation ResNet-18 (He et al. 2016). Images of any size.
* ``wrn-D-W`` (``wrn-28-10``, ``wrn-34-10``, …): WideResNet, see :mod:`robustopt.models.wrn`. Images of any size.
* ``small-cnn``: the TRADES MNIST net (Zhang et al. 2019): four conv3×3 layers and two FC 200 layers. 28×28 images.
* ``mlp``: a small two-layer perceptron on flattened inputs: images or flat feature vectors (D,).
* ``ibp-cnn``: a net for certified (IBP) training, no max-pooling: conv4×4·32 stride 2, ReLU, conv4×4·64 stride 2,
  ReLU, FC 256, ReLU, FC K (the shape of Gowal et al.'s / CROWN-IBP's small MNIST nets, wider). It is
  ``Normalized(nn.Sequential(...))``, so every certify method bounds it. Images (C, H, W) with H, W ≥ 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.errors import ConfigError
from robustopt.models.normalize import Normalize
from robustopt.models.pool import MaxPool2d
from robustopt.models.wrn import WideResNet
from robustopt.models.wrn import parse_name as parse_wrn_name


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
    """The authors' MNIST net. Input (B, C, H, W) in [0,1], H, W ≤ 32 (MNIST: 1×28×28) -> logits (B, K)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        # conv, ReLU, max-pool as the authors wrote it, computed as conv, max-pool, ReLU: ReLU is monotone, so
        # max(relu(z)) = relu(max(z)) and the gradients agree too, but ReLU then runs on maps 9× (4×) smaller.
        # On CPU that cuts the first block's forward + backward by ~40%. Parameter indices are unchanged.
        self.features = nn.Sequential(
            InputConv2d(in_channels, 32, 5),
            MaxPool2d(3, 3),  # 32 -> 28 -> 9
            nn.ReLU(),
            nn.Conv2d(32, 64, 5),
            MaxPool2d(2, 2),  # 9 -> 5 -> 2
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 200), nn.ReLU(), nn.Linear(200, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero-pad in pixel space (a black border) to 32×32, as the authors' MNIST (2 pixels each side for 28×28).
        top, left = (32 - x.shape[-2]) // 2, (32 - x.shape[-1]) // 2
        x = F.pad(x, (left, 32 - x.shape[-1] - left, top, 32 - x.shape[-2] - top))
        return self.classifier(self.features(self.normalize(x)))


_VGG_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class PaperCIFAR(nn.Module):
    """The authors' VGG-BN CIFAR net. Input (B, C, H, W) in [0,1], H, W ≥ 32 -> logits (B, K)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for i, v in enumerate(_VGG_CFG):
            if v == "M":
                layers.append(MaxPool2d(2, 2))
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
        out = self.features(self.normalize(x))
        if out.shape[-2:] != (1, 1):  # inputs larger than 32×32: average the last maps (a no-op at 32×32)
            out = F.adaptive_avg_pool2d(out, 1)
        return self.classifier(out)


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
    """Pre-activation ResNet-18 (CIFAR variant: 3×3 stem, no max-pool). (B, C, H, W) in [0,1] -> (B, K)."""

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
    FC 1024→200, ReLU, dropout 0.5, FC 200→200, ReLU, FC K. Input (B, C, 28, 28) in [0,1] -> logits (B, K)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            InputConv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), MaxPool2d(2, 2),  # 28→26→24→12
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), MaxPool2d(2, 2),  # 12→10→8→4
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class MLP(nn.Module):
    """Two-layer perceptron on flattened inputs; (B, C, H, W) or (B, D) -> (B, K)."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], num_classes: int = 10, in_features: int = 784, hidden: int = 256
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _mlp(mean: Sequence[float], std: Sequence[float], num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    return MLP(mean, std, num_classes, in_features=math.prod(shape))


def _ibp_cnn(mean: Sequence[float], std: Sequence[float], num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    """``ibp-cnn``: conv4×4·32 s2 p1, ReLU, conv4×4·64 s2 p1, ReLU, FC 256, ReLU, FC K, normalised inside."""
    h, w = shape[1] // 2 // 2, shape[2] // 2 // 2  # each stride-2 4×4 conv with padding 1 halves a side (rounding down)
    net = nn.Sequential(
        nn.Conv2d(shape[0], 32, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * h * w, 256), nn.ReLU(), nn.Linear(256, num_classes),
    )  # fmt: skip
    return Normalized(net, mean, std)


def _wrn(depth: int, width: int) -> ModelFactory:
    return lambda mean, std, k, shape: WideResNet(mean, std, depth=depth, width=width, num_classes=k, in_channels=shape[0])


ModelFactory = Callable[[Sequence[float], Sequence[float], int, tuple[int, ...]], nn.Module]

# Built-in architectures by name: factory(mean, std, num_classes, input_shape). Any ``wrn-D-W`` also resolves.
MODELS: dict[str, ModelFactory] = {
    "paper-mnist": lambda mean, std, k, shape: PaperMNIST(mean, std, k, in_channels=shape[0]),
    "small-cnn": lambda mean, std, k, shape: SmallCNN(mean, std, k, in_channels=shape[0]),
    "paper-cifar": lambda mean, std, k, shape: PaperCIFAR(mean, std, k, in_channels=shape[0]),
    "resnet18": lambda mean, std, k, shape: PreActResNet18(mean, std, k, in_channels=shape[0]),
    "wrn-28-10": _wrn(28, 10),
    "wrn-34-10": _wrn(34, 10),
    "mlp": _mlp,
    "ibp-cnn": _ibp_cnn,
}

# Image side lengths each convolutional architecture accepts: (smallest, largest); None: no bound.
_SIDES: dict[str, tuple[int | None, int | None]] = {
    "paper-mnist": (None, 32),
    "paper-cifar": (32, None),
    "small-cnn": (28, 28),
    "ibp-cnn": (4, None),
}


def resolve_model(name: str) -> ModelFactory:
    """The factory of a built-in architecture: a name in :data:`MODELS` or any ``wrn-D-W``."""
    if name in MODELS:
        return MODELS[name]
    depth_width = parse_wrn_name(name)
    if depth_width is None:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, wrn-DEPTH-WIDTH or package.module:fn")
    return _wrn(*depth_width)


def _check_input(name: str, shape: tuple[int, ...], mean: Sequence[float]) -> None:
    """A one-line ConfigError when architecture ``name`` cannot take inputs of ``shape``."""
    if name != "mlp" and len(shape) != 3:
        raise ConfigError(f"model {name!r} takes images (C, H, W), the data has shape {shape}; use mlp or your own model")
    lo, hi = _SIDES.get(name, (None, None))
    if len(shape) == 3 and ((lo and min(shape[1:]) < lo) or (hi and max(shape[1:]) > hi)):
        bound = f"at least {lo}" if lo else f"at most {hi}"
        raise ConfigError(f"model {name!r} needs image sides of {bound} pixels, the data is {shape[1]}×{shape[2]}")
    channels = shape[0] if len(shape) == 3 else math.prod(shape)
    if len(mean) not in (1, channels):
        raise ConfigError(f"model {name!r}: normalisation has {len(mean)} values, the data has {channels} channels")


def build_model(
    name: str, *, mean: Sequence[float], std: Sequence[float], num_classes: int, input_shape: tuple[int, ...]
) -> nn.Module:
    """Instantiate a built-in architecture for data of ``input_shape`` ((C, H, W) images or (D,) features)."""
    factory = resolve_model(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"model {name!r}: num_classes must be an integer >= 2, got {num_classes!r}")
    shape = tuple(int(d) for d in input_shape)
    _check_input(name, shape, mean)
    return factory(list(mean), list(std), num_classes, shape)


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
        return self.model(self.normalize(x))  # Normalize also handles flat features (B, D)
