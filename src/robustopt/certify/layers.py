"""A model as a small graph of bound-friendly operations, for interval and linear bound propagation.

:func:`build_graph` walks an ``nn.Module`` once and returns its computation as a list of nodes in
topological order; node 0 is the input. Supported: ``nn.Sequential``, ``Linear``, ``Conv2d``, ``ReLU``,
``BatchNorm1d/2d`` (running statistics, i.e. eval mode), ``Flatten``, ``AvgPool2d``, ``MaxPool2d``
(interval bounds only), ``Dropout``/``Identity`` (eval: the identity), robustopt's ``Normalized`` /
``Normalize`` and the built-in ``mlp``, ``paper-mnist`` and the TRADES small CNN, and residual
additions written as :class:`Residual`. Anything else raises :class:`~robustopt.errors.ConfigError`
naming the layer.

Every affine operation ``z = L(x) + b`` provides three maps, all differentiable in the weights:
``forward(x)``, ``absolute(r)`` (``|L| r``, the radius map of interval arithmetic) and
``transpose(A)`` (``A L`` for a batch of row vectors ``A`` (N, S, *out) -> (N, S, *in)``, the step of
the backward linear relaxation), plus ``bias_term(A) = A·b`` (N, S).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.errors import ConfigError
from robustopt.models.normalize import Normalize
from robustopt.models.zoo import MLP, Normalized, PaperMNIST, SmallCNN
from robustopt.tensors import unwrap

Tensor = torch.Tensor


class Residual(nn.Module):
    """``body(x) + shortcut(x)`` (``shortcut`` defaults to the identity): a residual block the certifier can read."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


def _rows(a: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(N, S, *shape) -> ((N·S, *shape), (N, S))."""
    return a.reshape(-1, *a.shape[2:]), (a.shape[0], a.shape[1])


class Affine:
    """Base of the affine operations. ``affine = True`` marks them for the bound code."""

    affine = True
    elementwise = False

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def absolute(self, r: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def transpose(self, a: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def bias_term(self, a: Tensor) -> Tensor | None:
        return None


class LinearOp(Affine):
    def __init__(self, m: nn.Linear) -> None:
        self.weight, self.bias = m.weight, m.bias  # (O, I), (O,)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def absolute(self, r: Tensor) -> Tensor:
        return F.linear(r, self.weight.abs())

    def forward_squared(self, s2: Tensor) -> Tensor:
        return F.linear(s2, self.weight.square())

    def transpose(self, a: Tensor) -> Tensor:
        return a @ self.weight

    def bias_term(self, a: Tensor) -> Tensor | None:
        return None if self.bias is None else a @ self.bias


class ConvOp(Affine):
    def __init__(self, m: nn.Conv2d, in_shape: tuple[int, ...]) -> None:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            what = f"padding {m.padding!r}/{m.padding_mode!r}"
            raise ConfigError(f"certify: Conv2d with {what} is not supported; use integer zero padding")
        self.weight, self.bias, self.in_shape = m.weight, m.bias, in_shape
        self.kw = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, **self.kw)

    def absolute(self, r: Tensor) -> Tensor:
        return F.conv2d(r, self.weight.abs(), None, **self.kw)

    def forward_squared(self, s2: Tensor) -> Tensor:
        return F.conv2d(s2, self.weight.square(), None, **self.kw)

    def transpose(self, a: Tensor) -> Tensor:
        rows, (n, s) = _rows(a)
        out = F.conv_transpose2d(rows, self.weight, None, output_padding=self._output_padding(rows.shape[-2:]), **self.kw)
        return out.reshape(n, s, *self.in_shape)

    def _output_padding(self, out_hw: torch.Size) -> tuple[int, int]:
        k, st, p, d = self.weight.shape[-2:], self.kw["stride"], self.kw["padding"], self.kw["dilation"]
        return tuple(self.in_shape[i + 1] - ((out_hw[i] - 1) * st[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1) for i in range(2))

    def bias_term(self, a: Tensor) -> Tensor | None:
        return None if self.bias is None else (a.sum(dim=(-2, -1)) * self.bias).sum(-1)


class ChannelAffineOp(Affine):
    """``x·scale + shift`` per channel (or per feature): BatchNorm with running statistics, Normalize."""

    elementwise = True  # output coordinates are scaled copies of input coordinates (or zeros)

    def __init__(self, scale: Tensor, shift: Tensor, shape: tuple[int, ...]) -> None:
        view = (-1,) + (1,) * (len(shape) - 1)  # (C, 1, 1) for images, (D,) for features
        self.scale, self.shift = scale.reshape(view), shift.reshape(view)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def absolute(self, r: Tensor) -> Tensor:
        return r * self.scale.abs()

    def transpose(self, a: Tensor) -> Tensor:
        return a * self.scale

    def bias_term(self, a: Tensor) -> Tensor | None:
        return (a * self.shift).flatten(2).sum(-1)


class ReshapeOp(Affine):
    """Flatten (or any reshape): ``transpose`` reshapes back."""

    elementwise = True  # output coordinates are scaled copies of input coordinates (or zeros)

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    absolute = forward

    def transpose(self, a: Tensor) -> Tensor:
        return a.reshape(*a.shape[:2], *self.in_shape)


class ZeroPadOp(Affine):
    """Zero padding (paper-mnist's black border); its transpose crops."""

    elementwise = True  # output coordinates are scaled copies of input coordinates (or zeros)

    def __init__(self, pad: tuple[int, int, int, int]) -> None:
        self.pad = pad  # (left, right, top, bottom)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad)

    absolute = forward

    def transpose(self, a: Tensor) -> Tensor:
        left, right, top, bottom = self.pad
        return a[..., top : a.shape[-2] - bottom, left : a.shape[-1] - right]


class AvgPoolOp(Affine):
    """AvgPool2d as a depthwise convolution with weight 1/k² (zero padding counted, as PyTorch's default)."""

    def __init__(self, m: nn.AvgPool2d, in_shape: tuple[int, ...], like: Tensor) -> None:
        if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
            raise ConfigError("certify: AvgPool2d needs ceil_mode=False, count_include_pad=True and no divisor_override")
        k, c = _pair(m.kernel_size), in_shape[0]
        conv = nn.Conv2d(c, c, k, stride=_pair(m.stride or m.kernel_size), padding=_pair(m.padding), groups=c, bias=False)
        conv = conv.to(device=like.device, dtype=like.dtype).requires_grad_(False)
        conv.weight.fill_(1.0 / math.prod(k))
        self.op = ConvOp(conv, in_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.op.forward(x)

    def absolute(self, r: Tensor) -> Tensor:
        return self.op.forward(r)

    def transpose(self, a: Tensor) -> Tensor:
        return self.op.transpose(a)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ReluOp:
    affine = False


class MaxPoolOp:
    """Interval bounds only: max is monotone, so [max(lo), max(hi)]."""

    affine = False

    def __init__(self, m: nn.MaxPool2d) -> None:
        self.module = m


class AddOp:
    affine = False


@dataclass
class Node:
    op: object | None  # None for the input node
    inputs: tuple[int, ...]
    shape: tuple[int, ...]  # per-example output shape


Graph = list[Node]


def build_graph(model: nn.Module, like: Tensor) -> Graph:
    """The computation of ``model`` on inputs shaped like ``like`` (B, C, H, W) or (B, D), as nodes.

    Raises ConfigError naming the first layer the certifier does not support. A DDP, DataParallel or torch.compile
    wrapper is traced through: the module it wraps holds the same parameters, so the bounds' weight gradients reach
    the wrapper's gradient hooks (under DDP the clean forward through the wrapper has prepared them)."""
    model = unwrap(model)
    graph: Graph = [Node(None, (), tuple(like.shape[1:]))]
    out = _trace(model, graph, 0, type(model).__name__, like[:1].detach())
    if out != len(graph) - 1:  # the output is an earlier node (e.g. a model that is the identity)
        graph.append(Node(ReshapeOp(graph[out].shape, graph[out].shape), (out,), graph[out].shape))
    return graph


def _add(graph: Graph, op: object, inputs: tuple[int, ...], fn: Callable[[Tensor], Tensor], probe: Tensor) -> tuple[int, Tensor]:
    """Append a node; ``fn(probe)`` is its output on one input (computed without gradients, for later shapes)."""
    with torch.no_grad():
        out = fn(probe)
    graph.append(Node(op, inputs, tuple(out.shape[1:])))
    return len(graph) - 1, out


def _trace(module: nn.Module, graph: Graph, node: int, path: str, probe: Tensor) -> int:
    """Append ``module`` applied to ``node``; returns the output node. ``probe`` is ``node``'s value on one input."""
    return _trace_probe(module, graph, node, path, probe)[0]


def _trace_probe(module: nn.Module, graph: Graph, node: int, path: str, probe: Tensor) -> tuple[int, Tensor]:
    shape = graph[node].shape
    children = _composition(module, probe)
    if children is not None:
        for name, child in children:
            if isinstance(child, ZeroPadOp):
                node, probe = _add(graph, child, (node,), child.forward, probe)
            else:
                node, probe = _trace_probe(child, graph, node, f"{path}.{name}", probe)
        return node, probe
    if isinstance(module, Residual):
        a, _ = _trace_probe(module.body, graph, node, f"{path}.body", probe)
        b, _ = _trace_probe(module.shortcut, graph, node, f"{path}.shortcut", probe)
        return _add(graph, AddOp(), (a, b), module, probe)
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return node, probe
    if isinstance(module, nn.ReLU):
        return _add(graph, ReluOp(), (node,), F.relu, probe)
    if isinstance(module, nn.MaxPool2d):
        return _add(graph, MaxPoolOp(module), (node,), module, probe)
    op = _affine(module, shape, probe, path)
    return _add(graph, op, (node,), op.forward, probe)


def _composition(module: nn.Module, probe: Tensor) -> list[tuple[str, object]] | None:
    """The children a container applies in order, or None for a leaf."""
    if isinstance(module, nn.Sequential):
        return list(module.named_children())
    if isinstance(module, Normalized):
        return [("normalize", module.normalize), ("model", module.model)]
    if isinstance(module, MLP):
        return [("normalize", module.normalize), ("net", module.net)]
    if isinstance(module, SmallCNN):
        return [("normalize", module.normalize), ("features", module.features), ("classifier", module.classifier)]
    if isinstance(module, PaperMNIST):  # zero-pads to 32×32 in pixel space first, as its forward does
        h, w = probe.shape[-2:]
        pad = ((32 - w) // 2, 32 - w - (32 - w) // 2, (32 - h) // 2, 32 - h - (32 - h) // 2)
        return [("pad", ZeroPadOp(pad)), ("normalize", module.normalize), ("features", module.features),
                ("classifier", module.classifier)]  # fmt: skip
    return None


def _affine(module: nn.Module, shape: tuple[int, ...], probe: Tensor, path: str) -> Affine:
    """The affine operation of a supported linear layer, or a ConfigError naming the layer."""
    if isinstance(module, nn.Linear):
        return LinearOp(module)
    if isinstance(module, nn.Conv2d):
        return ConvOp(module, shape)
    if isinstance(module, nn.Flatten):
        return ReshapeOp(shape, tuple(probe.flatten(module.start_dim, module.end_dim).shape[1:]))
    if isinstance(module, nn.AvgPool2d):
        return AvgPoolOp(module, shape, probe)
    if isinstance(module, Normalize):
        return ChannelAffineOp(1.0 / module.std.flatten(), -module.mean.flatten() / module.std.flatten(), shape)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_var is not None:
        scale = module.running_var.add(module.eps).rsqrt()
        scale = scale * module.weight if module.weight is not None else scale
        shift = -module.running_mean * scale + (module.bias if module.bias is not None else 0.0)
        return ChannelAffineOp(scale, shift, shape)
    raise ConfigError(
        f"certify: unsupported layer {path} ({type(module).__name__}); supported: Linear, Conv2d, ReLU, BatchNorm "
        "with running statistics, Flatten, AvgPool2d, MaxPool2d (IBP), Dropout, Normalized, nn.Sequential and "
        "robustopt.certify.Residual"
    )
