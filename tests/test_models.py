"""Models: shapes, [0,1] inputs with normalisation inside, and the fast first conv's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustopt.errors import ConfigError
from robustopt.models.zoo import InputConv2d, build_model


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("paper-mnist", (1, 28, 28)),
        ("paper-cifar", (3, 32, 32)),
        ("resnet18", (3, 32, 32)),
        ("mlp", (1, 28, 28)),
        ("ibp-cnn", (1, 28, 28)),
        ("ibp-cnn", (3, 32, 30)),
    ],
)
def test_models_map_unit_inputs_to_logits(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, mean=[0.5] * shape[0], std=[0.25] * shape[0], num_classes=10, input_shape=shape).eval()
    with torch.no_grad():
        out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_normalisation_lives_inside_the_model() -> None:
    """Raising the stored mean by 0.2 equals lowering the input by 0.2: the model sees pixel units."""
    a = build_model("mlp", mean=[0.0], std=[1.0], num_classes=10, input_shape=(1, 4, 4))
    b = build_model("mlp", mean=[0.2], std=[1.0], num_classes=10, input_shape=(1, 4, 4))
    b.load_state_dict({**a.state_dict(), "normalize.mean": b.normalize.mean})
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(a(x - 0.2), b(x))


def test_input_conv_matches_conv2d_values_and_gradients() -> None:
    torch.manual_seed(0)
    fast = InputConv2d(1, 6, 5).double()
    ref = torch.nn.Conv2d(1, 6, 5).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda inp, w, b: InputConv2d.forward(fast, inp), (x, fast.weight, fast.bias))
    out_fast, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out_fast, out_ref)
    g = torch.randn_like(out_ref)
    gf = torch.autograd.grad(out_fast, [x, fast.weight, fast.bias], g)
    gr = torch.autograd.grad(out_ref, [x, ref.weight, ref.bias], g)
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(F.conv2d(x, fast.weight, fast.bias), out_fast)


def test_wrong_input_shape_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="at most 32 pixels, the data is 64×64"):
        build_model("paper-mnist", mean=[0.5] * 3, std=[0.2] * 3, num_classes=10, input_shape=(3, 64, 64))
    with pytest.raises(ConfigError, match="at least 32 pixels, the data is 28×28"):
        build_model("paper-cifar", mean=[0.5], std=[0.2], num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match=r"takes images \(C, H, W\), the data has shape \(20,\); use mlp"):
        build_model("resnet18", mean=[0.5], std=[0.2], num_classes=10, input_shape=(20,))
    with pytest.raises(ConfigError, match="normalisation has 3 values, the data has 1 channels"):
        build_model("resnet18", mean=[0.5] * 3, std=[0.2] * 3, num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2"):
        build_model("mlp", mean=[0.5], std=[0.2], num_classes=1, input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vgg99", mean=[0.5], std=[0.2], num_classes=10, input_shape=(1, 28, 28))


def test_paper_mnist_is_the_authors_conv_relu_pool_order_in_value_and_gradient() -> None:
    """Pooling before ReLU (our speed-up) computes the authors' conv → ReLU → max-pool exactly, gradients included."""
    torch.manual_seed(0)
    model = build_model("paper-mnist", mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28))
    conv1, pool1, _, conv2, pool2, _ = model.features

    def authors(x: torch.Tensor) -> torch.Tensor:
        h = model.normalize(F.pad(x, (2, 2, 2, 2)))
        h = pool1(F.relu(F.conv2d(h, conv1.weight, conv1.bias)))
        h = pool2(F.relu(conv2(h)))
        return model.classifier(h)

    x = torch.rand(16, 1, 28, 28, requires_grad=True)
    y = torch.randint(0, 10, (16,))
    ours, ref = model(x), authors(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    g_ours, *w_ours = torch.autograd.grad(F.cross_entropy(ours, y), [x, *model.parameters()])
    g_ref, *w_ref = torch.autograd.grad(F.cross_entropy(ref, y), [x, *model.parameters()])
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    for a, b in zip(w_ours, w_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
