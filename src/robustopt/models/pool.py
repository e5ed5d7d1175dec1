"""Max-pooling with kernel = stride, computed as an elementwise maximum of k² strided views.

Why: on CPU, ``F.max_pool2d`` always runs ``max_pool2d_with_indices`` (indices are formed even under
``no_grad``), which on the built-in MNIST nets is about 10× slower than k²−1 ``torch.maximum`` calls
on strided views (4.8 ms vs 0.47 ms for a (50, 32, 24, 24) map, one thread) and was a quarter of
small-cnn's forward time, so of every Square query and every prediction. On other devices
(CUDA) torch's kernel is kept: there one fused kernel beats k²−1 launches.

Exactness. A maximum involves no rounding, so the output is bit-identical to ``F.max_pool2d``
(floor mode: trailing rows and columns that do not fill a window are dropped, as there; NaN
propagates). The fast path runs only where no gradient will flow through the pool (under
``no_grad``, or on an input that does not require grad): Square's queries, the cascade's and
APGD's final predictions, clean accuracy, every evaluation forward. Where a gradient is needed
``nn.MaxPool2d``'s own path runs, so input gradients are unchanged: a backward written over the
strided views measured 8-20% slower than max_pool2d's index scatter (small-cnn, paper-mnist,
batch 100, one thread). Pools with padding, dilation, ``ceil_mode``, ``return_indices`` or
kernel ≠ stride always take ``nn.MaxPool2d``'s path.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def _views(x: Tensor, k: int) -> list[Tensor]:
    """The k² strided views x[..., i::k, j::k] of the floor-mode crop, in row-major window order."""
    h, w = (x.shape[-2] // k) * k, (x.shape[-1] // k) * k
    return [x[..., i:h:k, j:w:k] for i in range(k) for j in range(k)]


def window_max(x: Tensor, k: int) -> Tensor:
    """max over each non-overlapping k×k window: (..., H, W) -> (..., H // k, W // k), NaN-propagating."""
    views = _views(x, k)
    out = views[0]
    for v in views[1:]:
        out = torch.maximum(out, v)
    return out.contiguous() if out is views[0] else out


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with a fast exact path for kernel = stride, no padding, no dilation (see the module doc).

    The fast path runs only where no gradient flows through the pool. A drop-in subclass: same
    arguments, no parameters or buffers (checkpoints are unchanged), and ``isinstance(m,
    nn.MaxPool2d)`` holds, so the certifiers' interval bounds treat it as before.
    Input (B, C, H, W) or (C, H, W) -> (..., H // k, W // k).
    """

    def _fast(self) -> int | None:
        k, s = self.kernel_size, self.stride
        k = k if isinstance(k, int) else (k[0] if k[0] == k[1] else None)
        s = s if isinstance(s, int) else (s[0] if s[0] == s[1] else None)
        plain = self.padding in (0, (0, 0)) and self.dilation in (1, (1, 1)) and not self.ceil_mode
        return k if k is not None and k == s and plain and not self.return_indices else None

    def forward(self, x: Tensor) -> Tensor:
        k = self._fast()
        if k is None or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        if x.dim() not in (3, 4) or x.shape[-2] < k or x.shape[-1] < k:
            return super().forward(x)  # torch's own error for a map smaller than the window
        return window_max(x, k)


def use_torch_pools(module: nn.Module) -> nn.Module:
    """Replace every :class:`MaxPool2d` inside ``module`` by a plain ``nn.MaxPool2d`` of the same shape, in place.

    For side-by-side checks (tests, ``benchmarks/bench_maxpool.py``): the result computes the same
    function by torch's own pooling path. Returns ``module``.
    """
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                                   ceil_mode=child.ceil_mode))  # fmt: skip
    return module
