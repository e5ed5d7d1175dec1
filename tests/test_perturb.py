"""The generic ascent loop: closed forms, PGD invariants, and that it leaves the model alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustopt.errors import ConfigError, DataError, RobustoptError
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import input_gradient, perturb

NORMS = ["linf", "l2", "l1"]
Q = {"linf": 1, "l2": 2, "l1": math.inf}
WIDE = (-1e6, 1e6)  # a domain so large that clipping never binds


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()


class Recorder(nn.Module):
    """Wraps a model and records every input it is called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("norm", NORMS)
def test_first_order_step_is_the_closed_form(norm: str) -> None:
    """δ = ε·d with ⟨g, δ⟩ = ε‖g‖_q and ‖δ‖_p = ε before clipping (Shaham et al., Sec. 3)."""
    model = small_net()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    eps = 0.3
    tm = ThreatModel(norm, eps, bounds=WIDE)
    g, _ = input_gradient(model, x, y)
    delta = perturb(model, x, y, tm) - x
    inner = (g * delta).flatten(1).sum(1)
    dual = torch.tensor([np.linalg.norm(r.ravel(), Q[norm]) for r in g.numpy()], dtype=torch.float64)
    torch.testing.assert_close(inner, eps * dual)
    torch.testing.assert_close(tm.norm_of(delta), torch.full((6,), eps, dtype=torch.float64))
    if norm == "l1":
        assert ((delta != 0).flatten(1).sum(1) == 1).all()


def test_first_order_linf_is_fgsm_with_clipping() -> None:
    model = small_net()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    g, _ = input_gradient(model, x, y)
    expected = (x + 0.2 * g.sign()).clamp(0, 1)
    torch.testing.assert_close(perturb(model, x, y, ThreatModel("linf", 0.2)), expected)


@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), eps=st.floats(0.05, 2.0), steps=st.integers(2, 6), rs=st.booleans())
def test_every_pgd_iterate_stays_in_ball_and_domain(norm: str, seed: int, eps: float, steps: int, rs: bool) -> None:
    model = Recorder(small_net(seed % 7))
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    tm = ThreatModel(norm, eps, sparsity=0.2)
    out = perturb(model, x, y, tm, steps=steps, step_size=eps, random_start=rs, generator=gen)
    assert len(model.seen) == steps
    for it in [*model.seen, out]:
        assert tm.contains(it, x, atol=1e-9).all()


def test_pgd_on_linear_model_reaches_the_vertex() -> None:
    """For a linear 2-class model the loss is maximised at x - ε·sign(w_y - w_other): PGD must find it."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    tm = ThreatModel("linf", 0.1, bounds=WIDE)
    out = perturb(lin, x, y, tm, steps=20, random_start=True, generator=torch.Generator().manual_seed(0))
    w = lin[1].weight.detach()
    direction = (w[1 - y] - w[y]).sign().view(8, 1, 4, 4)
    torch.testing.assert_close(out, x + 0.1 * direction)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("steps", [1, 5])
def test_perturb_leaves_model_untouched(train_mode: bool, steps: int) -> None:
    """Mode, BatchNorm running statistics and weights are unchanged; no weight gradients appear."""
    model = BNNet().train(train_mode)
    model.net[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(10, 1, 6, 6), torch.randint(0, 3, (10,))
    perturb(model, x, y, ThreatModel("l2", 0.5), steps=steps, random_start=steps > 1)
    assert model.training is train_mode and all(m.training is train_mode for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_perturb_increases_the_loss() -> None:
    model = small_net()
    x = torch.rand(32, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    loss = lambda z: nn.functional.cross_entropy(model(z), y).item()
    tm = ThreatModel("linf", 0.1)
    one = perturb(model, x, y, tm)
    many = perturb(model, x, y, tm, steps=20)
    assert loss(x) < loss(one) <= loss(many) + 1e-9


@pytest.mark.parametrize("steps", [1, 4])
def test_perturb_works_inside_no_grad_and_gives_the_same_points(steps: int) -> None:
    """A validation step runs under torch.no_grad(): the inner maximisation turns gradients on itself."""
    model, tm = small_net(), ThreatModel("l2", 0.3)
    x, y = torch.rand(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    outside = perturb(model, x, y, tm, steps=steps)
    with torch.no_grad():
        inside = perturb(model, x, y, tm, steps=steps)
    assert torch.equal(inside, outside)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_perturb_under_inference_mode_says_what_to_do() -> None:
    model, tm = small_net(), ThreatModel("linf", 0.1)
    x, y = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    advice = r"outside torch.inference_mode\(\) \(torch.no_grad\(\) is fine\)"
    with torch.inference_mode(), pytest.raises(ConfigError, match=advice):
        perturb(model, x, y, tm, steps=2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"threat": None}, ConfigError, "threat must be a ThreatModel"),
        ({"x": torch.zeros(4, 16, dtype=torch.int64)}, DataError, "dtype"),
        ({"x": torch.full((4, 16), float("nan"))}, DataError, "NaN"),
        ({"model": lambda z: z}, ConfigError, "torch.nn.Module"),
        ({"steps": 0}, ConfigError, "steps must be"),
    ],
)
def test_perturb_refuses_bad_input_with_one_typed_line(kwargs, error, match) -> None:
    args = {"model": nn.Linear(16, 3), "x": torch.rand(4, 16), "y": torch.randint(0, 3, (4,)), "threat": ThreatModel("linf", 0.1)}
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        perturb(args.pop("model"), args.pop("x"), args.pop("y"), args.pop("threat"), **args)
    assert isinstance(info.value, RobustoptError) and "\n" not in str(info.value)


def test_per_example_radii_match_the_scalar_threat() -> None:
    """ThreatModel.project with radius r_i (B,) is the projection onto each example's own ball."""
    torch.manual_seed(0)
    x, far = torch.rand(6, 20), torch.rand(6, 20)
    radius = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0, 3.0])
    for norm in NORMS:
        tm = ThreatModel(norm, 1.0)
        out = tm.project(far, x, radius)
        for i, r in enumerate(radius.tolist()):
            assert torch.allclose(out[i], tm.with_eps(r).project(far[i : i + 1], x[i : i + 1])[0], atol=1e-6), (norm, i)
