"""The generic ascent loop: closed forms, PGD invariants, and that it leaves the model alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

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
