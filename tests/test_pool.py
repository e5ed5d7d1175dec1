"""The fast max-pool (robustopt.models.pool) is bit-identical to F.max_pool2d, and only runs where no gradient flows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustopt.models import build
from robustopt.models.pool import MaxPool2d, use_torch_pools, window_max


def _special(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x with ties (small integers), -inf, +inf and NaN sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.5, torch.randint(-2, 3, x.shape, generator=g).to(x.dtype), x)
    for value, p in ((float("-inf"), 0.05), (float("inf"), 0.02), (float("nan"), 0.03)):
        x = torch.where(torch.rand(x.shape, generator=g) < p, torch.full_like(x, value), x)
    return x


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 4),
    b=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(4, 13),
    w=st.integers(4, 13),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    batched=st.booleans(),
)
def test_window_max_equals_max_pool2d(k, b, c, h, w, seed, dtype, batched):
    x = _special(torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype), seed)
    x = x if batched else x[0]
    expected = F.max_pool2d(x, k)
    got = window_max(x, k)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_channels_last_and_non_contiguous_inputs():
    x = torch.randn(2, 8, 10, 10)
    for view in (x.contiguous(memory_format=torch.channels_last), x[:, ::2], x.transpose(-1, -2)):
        assert torch.equal(MaxPool2d(2, 2)(view), F.max_pool2d(view, 2))


def test_module_fast_path_only_without_gradient(monkeypatch):
    calls = []
    monkeypatch.setattr("robustopt.models.pool.window_max", lambda x, k: calls.append(k) or F.max_pool2d(x, k))
    pool, x = MaxPool2d(2, 2), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        pool(x.requires_grad_(True))
    pool(torch.randn(2, 3, 8, 8))  # grad mode, but the input needs no gradient
    assert calls == [2, 2]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    pool(x).sum().backward()  # nn.MaxPool2d's own path: the gradient is max_pool2d's
    ref = x.detach().clone().requires_grad_(True)
    F.max_pool2d(ref, 2).sum().backward()
    assert calls == [2, 2] and torch.equal(x.grad, ref.grad)


@pytest.mark.parametrize(
    "kwargs",
    [{"kernel_size": 3, "stride": 2}, {"kernel_size": 2, "padding": 1}, {"kernel_size": 2, "ceil_mode": True},
     {"kernel_size": 2, "dilation": 2}, {"kernel_size": (2, 3)}],
)  # fmt: skip
def test_other_pools_fall_back_to_nn_maxpool2d(kwargs):
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(MaxPool2d(**kwargs)(x), nn.MaxPool2d(**kwargs)(x))


def test_too_small_input_keeps_torch_error():
    with pytest.raises(RuntimeError):
        MaxPool2d(3, 3)(torch.randn(1, 1, 2, 2))


def test_is_an_nn_maxpool2d_without_state():
    pool = MaxPool2d(2, 2)
    assert isinstance(pool, nn.MaxPool2d) and not pool.state_dict()


@pytest.mark.parametrize("spec", ["small-cnn", "paper-mnist"])
def test_builtin_nets_give_the_same_logits_and_gradients_as_with_nn_maxpool2d(spec):
    torch.manual_seed(0)
    net = build(spec, {}, mean=(0.1307,), std=(0.3081,), num_classes=10, input_shape=(1, 28, 28)).eval()
    plain = build(spec, {}, mean=(0.1307,), std=(0.3081,), num_classes=10, input_shape=(1, 28, 28)).eval()
    plain.load_state_dict(net.state_dict())
    use_torch_pools(plain)
    assert not any(isinstance(m, MaxPool2d) for m in plain.modules())
    assert sum(isinstance(m, MaxPool2d) for m in net.modules()) == 2
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    grads = []
    for m in (net, plain):
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xx), y), xx)
        grads.append(g)
    assert torch.equal(*grads)


def test_fast_path_is_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr("robustopt.models.pool.window_max", lambda x, k: calls.append(k) or F.max_pool2d(x, k))
    x = torch.randn(1, 2, 4, 4, device="meta")
    with torch.no_grad():
        assert MaxPool2d(2, 2)(x).shape == (1, 2, 2, 2)
    assert calls == []
