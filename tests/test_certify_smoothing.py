"""Randomized smoothing: Clopper–Pearson by hand, radii of models whose smoothed probabilities are known."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm
from torch import nn

from robustopt.certify import certify
from robustopt.certify.smoothing import ABSTAIN, certified_radius, clopper_pearson_lower, smoothed_certify
from robustopt.errors import ConfigError
from robustopt.threat.model import ThreatModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("k,n,alpha", [(10, 10, 0.05), (95, 100, 0.001), (500, 1000, 0.01), (7, 20, 0.1)])
def test_clopper_pearson_matches_the_binomial_tail_by_hand(k: int, n: int, alpha: float) -> None:
    """The lower bound p solves P(Bin(n, p) ≥ k) = α; for k = n that is p = α^(1/n)."""
    by_hand = brentq(lambda p: binom.sf(k - 1, n, p) - alpha, 1e-12, 1 - 1e-12, xtol=1e-14)
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(by_hand, abs=1e-9)
    if k == n:
        assert clopper_pearson_lower(k, n, alpha) == pytest.approx(alpha ** (1 / n), abs=1e-12)
    assert clopper_pearson_lower(0, n, alpha) == 0.0


def test_radius_is_sigma_times_inverse_normal_and_abstains_below_half() -> None:
    assert certified_radius(0.9, 0.5) == pytest.approx(0.5 * norm.ppf(0.9))
    assert certified_radius(0.49, 0.5) < 0


class Constant(nn.Module):
    def __init__(self, k: int = 3, c: int = 0) -> None:
        super().__init__()
        self.k, self.c = k, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.c), self.k).float()


def test_constant_model_gets_the_closed_form_radius() -> None:
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 0, 1])
    out = smoothed_certify(Constant(), x, y, ThreatModel("l2", 0.5), sigma=0.25, n=1000, n0=10, alpha=0.001)
    expected = 0.25 * norm.ppf(0.001 ** (1 / 1000))
    assert torch.allclose(out.radius, torch.full((3,), expected, dtype=torch.float64))
    assert out.correct.tolist() == [True, True, False] and out.verified.tolist() == [True, True, False]
    assert out.certified_accuracy[0.0] == pytest.approx(2 / 3) and out.certified_accuracy[1.0] == 0.0


def test_linear_model_radius_is_sound_and_close_to_the_distance_to_the_boundary() -> None:
    """f(x) = [w·x > b]: P(f(x + σε) = 1) = Φ((w·x − b)/(σ‖w‖)), so g's exact radius is the distance to the plane."""
    torch.manual_seed(0)
    w, b = torch.tensor([3.0, -1.0]), 0.2
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([-w, w]) / 2)
        lin.bias.copy_(torch.tensor([b, -b]) / 2)
    x = torch.rand(8, 2)
    y = (x @ w > b).long()
    sigma = 0.3
    out = smoothed_certify(lin, x, y, ThreatModel("l2", 0.1), sigma=sigma, n=20_000, n0=100, alpha=0.001, seed=1)
    distance = ((x @ w - b).abs() / w.norm()).double()
    certified = out.prediction != ABSTAIN
    assert bool((out.prediction[certified] == y[certified]).all())
    assert bool((out.radius[certified] <= distance[certified]).all())  # holds with probability ≥ 1 − α each
    far = distance > 0.3 * sigma
    assert bool(certified[far].all()) and bool((out.radius[far] >= distance[far] - 0.3 * sigma).all())


def test_point_on_the_boundary_abstains_and_results_are_seeded() -> None:
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        lin.bias.zero_()
    x, y = torch.tensor([[0.0, 0.5]]), torch.tensor([1])
    out = smoothed_certify(lin, x, y, ThreatModel("l2", 0.1), sigma=0.5, n=2000, n0=50)
    assert out.prediction.tolist() == [ABSTAIN] and not out.verified.any() and not out.correct.any()
    x2 = torch.rand(4, 2)
    first = certify(lin, x2, (x2[:, 0] > 0).long(), ThreatModel("l2", 0.1), "smoothing", sigma=0.25, n=500, seed=3)
    again = certify(lin, x2, (x2[:, 0] > 0).long(), ThreatModel("l2", 0.1), "smoothing", sigma=0.25, n=500, seed=3)
    assert torch.equal(first.radius, again.radius)
    assert first.to_dict()["certified_accuracy"].keys() == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert math.isclose(first.verified_accuracy, float(first.verified.float().mean()))


def test_smoothing_refuses_linf_and_missing_sigma() -> None:
    x, y = torch.rand(2, 2), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="l2"):
        certify(Constant(2), x, y, ThreatModel("linf", 0.1), "smoothing", sigma=0.25)
    with pytest.raises(ConfigError, match="sigma"):
        certify(Constant(2), x, y, ThreatModel("l2", 0.1), "smoothing")
    with pytest.raises(ConfigError, match="only apply to method='smoothing'"):
        certify(Constant(2), x, y, ThreatModel("l2", 0.1), "ibp", sigma=0.25)
