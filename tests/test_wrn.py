"""WideResNet and the zoo's shape generality: parameter counts, any K, any input shape, gradients flow."""

from __future__ import annotations

import pytest
import torch

from robustopt.errors import ConfigError
from robustopt.models.wrn import WideResNet
from robustopt.models.zoo import build_model, resolve_model


def _count(name: str, k: int = 10) -> int:
    with torch.device("meta"):  # no memory, no initialisation cost: only the shapes matter
        model = build_model(name, mean=[0.5] * 3, std=[0.25] * 3, num_classes=k, input_shape=(3, 32, 32))
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_robustness_literatures_wrns() -> None:
    """WRN-34-10 (Madry, TRADES) ≈ 46.2M and WRN-28-10 (RobustBench) ≈ 36.5M parameters for 10 classes."""
    assert _count("wrn-34-10") == 46_160_474
    assert _count("wrn-28-10") == 36_479_194
    # 100 classes add 90 rows of the final 640-wide linear layer (weights and biases).
    assert _count("wrn-28-10", k=100) - _count("wrn-28-10") == 90 * 641


def test_tiny_wrn_forward_backward_and_block_structure() -> None:
    torch.manual_seed(0)
    model = build_model("wrn-10-1", mean=[0.5] * 3, std=[0.25] * 3, num_classes=7, input_shape=(3, 32, 32))
    assert isinstance(model, WideResNet) and len(model.blocks) == 3  # (10 - 4) / 6 = 1 block per group
    assert [b.conv1.out_channels for b in model.blocks] == [16, 32, 64]
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "wrn-10-1", "paper-cifar", "paper-mnist", "mlp"])
@pytest.mark.parametrize(("shape", "k"), [((3, 32, 32), 100), ((1, 28, 28), 5), ((3, 16, 16), 3), ((1, 40, 36), 2)])
def test_every_zoo_net_takes_any_classes_and_the_shapes_it_can(name: str, shape: tuple[int, ...], k: int) -> None:
    """Built where the architecture allows it (a clear ConfigError otherwise), mapping (2, *shape) to (2, K) logits."""
    side_ok = {"paper-mnist": max(shape[1:]) <= 32, "paper-cifar": min(shape[1:]) >= 32}.get(name, True)
    args = dict(mean=[0.5] * shape[0], std=[0.25] * shape[0], num_classes=k, input_shape=shape)
    if not side_ok:
        with pytest.raises(ConfigError, match="image sides"):
            build_model(name, **args)
        return
    with torch.device("meta"):  # shapes only (values are checked in test_models and above): no memory, no compute
        model = build_model(name, **args).eval()
        out = model(torch.empty(2, *shape))
    assert out.shape == (2, k)


def test_mlp_on_flat_feature_vectors_normalises_per_feature() -> None:
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 0.5, 1.0, 4.0]
    model = build_model("mlp", mean=mean, std=std, num_classes=3, input_shape=(5,))
    x = torch.rand(6, 5)
    lin = model.net[1]
    expected = model.net[3](torch.relu(lin((x - torch.tensor(mean)) / torch.tensor(std))))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("name", ["wrn-12-1", "wrn-4-2", "wrn-16-0"])
def test_bad_wrn_depth_or_width_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="depth must be 6n\\+4"):
        build_model(name, mean=[0.5] * 3, std=[0.25] * 3, num_classes=10, input_shape=(3, 32, 32))


def test_unknown_names_are_config_errors() -> None:
    for bad in ("wrn", "wrn-28", "wrn-28-10-2", "WRN-28-10", "resnet50"):
        with pytest.raises(ConfigError, match="unknown model"):
            resolve_model(bad)


def test_normalized_wrapper_standardises_images_per_channel_and_features_per_feature() -> None:
    from robustopt.models.zoo import Normalized

    seen = []
    probe = torch.nn.Module()
    probe.forward = lambda z: seen.append(z) or z.flatten(1)[:, :2]  # records what the wrapped net receives
    x = torch.rand(2, 3, 4, 4)
    Normalized(probe, [0.1, 0.2, 0.3], [0.5, 1.0, 2.0])(x)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[-1], (x - mean) / std)
    f = torch.rand(5, 4)
    Normalized(probe, [0.5] * 4, [0.25, 0.5, 1.0, 2.0])(f)
    torch.testing.assert_close(seen[-1], (f - 0.5) / torch.tensor([0.25, 0.5, 1.0, 2.0]))
    Normalized(probe, [0.5], [0.25])(f)  # one value for every feature
    torch.testing.assert_close(seen[-1], (f - 0.5) / 0.25)
    with pytest.raises(ConfigError, match="std must be positive"):
        Normalized(probe, [0.5], [0.0])
