"""AutoAttack "standard" and FAB-T: exact on linear models, inside the threat model, a cascade that only breaks points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustopt.evaluation.attacks import run_attack
from robustopt.evaluation.attacks._common import cascade, predict
from robustopt.evaluation.attacks.autoattack import COMPONENTS, autoattack, standard_components
from robustopt.evaluation.attacks.fab import fab_run, hyperplane_step
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel

DUAL = {"l2": 2.0, "linf": 1.0, "l1": float("inf")}


def _linear(d: int, k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).double().eval()


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_hyperplane_step_is_the_closed_form_when_the_box_does_not_bind(norm):
    torch.manual_seed(1)
    p, w = torch.full((6, 50), 0.5, dtype=torch.float64), torch.randn(6, 50, dtype=torch.float64)
    c = torch.randn(6, dtype=torch.float64) * 1e-2  # small: the box [0, 1] is far away
    d = hyperplane_step(ThreatModel(norm, 1.0), p, w, c)
    assert torch.allclose((w * d).sum(1), c, atol=1e-12)  # on the hyperplane
    exact = c.abs() / torch.linalg.vector_norm(w, ord=DUAL[norm], dim=1)  # min ‖δ‖_p s.t. ⟨w, δ⟩ = c
    assert torch.allclose(torch.linalg.vector_norm(d, ord={"l2": 2, "linf": float("inf"), "l1": 1}[norm], dim=1), exact)


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_hyperplane_step_respects_the_box_and_moves_as_far_as_it_allows(norm):
    torch.manual_seed(2)
    p, w = torch.rand(8, 30, dtype=torch.float64), torch.randn(8, 30, dtype=torch.float64)
    c = torch.randn(8, dtype=torch.float64) * 3
    d = hyperplane_step(ThreatModel(norm, 1.0), p, w, c)
    assert bool(((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all())
    reach = torch.where(torch.sign(c)[:, None] * w > 0, 1 - p, p) * w.abs()  # the most ⟨w, δ⟩ the box allows
    expect = torch.minimum(c.abs(), reach.sum(1))
    assert torch.allclose((w * d).sum(1) * torch.sign(c), expect, atol=1e-9)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_t_finds_the_exact_minimal_perturbation_of_a_linear_model(norm):
    """Two classes: the only boundary is ⟨w, x⟩ + b = 0, at distance |g(x)| / ‖w‖_q."""
    model = _linear(40, 2)
    x = torch.rand(12, 1, 1, 40, dtype=torch.float64) * 0.2 + 0.4
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    best, dist = fab_run(model, x, y, 1 - y, ThreatModel(norm, 1.0), steps=20)
    w = model[1].weight[1] - model[1].weight[0]
    exact = (z[:, 1] - z[:, 0]).abs() / torch.linalg.vector_norm(w, ord=DUAL[norm])
    assert bool((predict(model, best) != y).all())
    assert bool((dist >= exact * (1 - 1e-9)).all())  # nothing closer exists
    assert bool((dist <= exact * 1.01).all()), dist / exact  # and FAB gets within 1% (η = 1.05, β = 0.9)


def _tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5), ("l1", 2.0)])
def test_every_autoattack_component_stays_in_ball_and_box(norm, eps):
    model, threat = _tiny_conv(), ThreatModel(norm, eps)
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,))
    for name, attack in standard_components(norm, steps=5, n_targets=3, queries=30, seed=0):
        x_adv = attack(model, x, y, threat)  # the raw output, before the cascade projects anything
        assert bool(threat.contains(x_adv, x, atol=1e-5).all()), name
    assert [n for n, _ in standard_components(norm, 5, 3, 30, 0)] == list(COMPONENTS[norm])


def test_the_cascade_never_raises_a_robust_count(standard_run, mnist_test_batch):
    model = load_model(standard_run)
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    threat, stats = ThreatModel("linf", 0.08), {}
    x_adv = autoattack(model, x, y, threat, steps=4, n_targets=2, queries=30, stats=stats)
    counts = list(stats.values())
    assert list(stats) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False)) and counts[0] > counts[-1]
    assert int((predict(model, x_adv) == y).sum()) == counts[-1]  # the returned points realise the count
    assert bool(threat.contains(x_adv, x).all())
    one = cascade(model, x, y, threat, standard_components("linf", 4, 2, 30, 0)[:1])
    assert counts[-1] <= int((predict(model, one) == y).sum())  # adding attacks only breaks more points


def test_autoattack_is_registered_and_deterministic(mnist_test_batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]
    kw = {"steps": 3, "n_targets": 2, "queries": 10}
    a = run_attack(model, x, y, ThreatModel("linf", 0.1), "autoattack", **kw)
    b = run_attack(model, x, y, ThreatModel("linf", 0.1), "autoattack", **kw)
    assert torch.equal(a, b)  # fixed seeds, whatever ran before
