"""Mathematics of the threat models: dual norms, projections, random starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from robustopt.errors import ConfigError
from robustopt.threat.model import ThreatModel

NORMS = ["linf", "l2", "l1"]
P = {"linf": math.inf, "l2": 2, "l1": 1}
Q = {"linf": 1, "l2": 2, "l1": math.inf}

finite = st.floats(-10, 10, allow_nan=False, width=32)
batches = arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5)), elements=finite)


@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=60, deadline=None)
@given(g=batches)
def test_ascent_direction_attains_dual_norm(norm: str, g: np.ndarray) -> None:
    """⟨d, g⟩ = ‖g‖_q with ‖d‖_p = 1: d maximises the linearised loss over the unit ball."""
    t = torch.from_numpy(g).double()
    tm = ThreatModel(norm, 1.0)
    d = tm.ascent_direction(t)
    inner = (d * t).flatten(1).sum(1)
    dual = torch.tensor([np.linalg.norm(row.ravel(), Q[norm]) for row in g], dtype=torch.float64)
    torch.testing.assert_close(inner, dual, rtol=1e-6, atol=1e-6)
    nonzero = dual > 0
    norms = tm.norm_of(d)
    torch.testing.assert_close(norms[nonzero], torch.ones_like(norms[nonzero]), rtol=1e-6, atol=1e-6)


def test_norms_match_numpy() -> None:
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    for norm in NORMS:
        ours = ThreatModel(norm, 1.0).norm_of(x)
        ref = [np.linalg.norm(r.ravel(), P[norm]) for r in x.numpy()]
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)


def test_l1_exact_step_touches_one_coordinate() -> None:
    g = torch.randn(8, 1, 28, 28)
    d = ThreatModel("l1", 1.0).ascent_direction(g)
    assert ((d != 0).flatten(1).sum(1) == 1).all()
    j = g.abs().flatten(1).argmax(1)
    picked = d.flatten(1).gather(1, j[:, None]).squeeze(1)
    assert torch.equal(picked, g.flatten(1).gather(1, j[:, None]).squeeze(1).sign())


def test_l1_iterative_step_is_sparse_and_unit() -> None:
    g = torch.randn(4, 1, 10, 10)
    tm = ThreatModel("l1", 1.0, sparsity=0.05)
    d = tm.ascent_direction(g, iterative=True)
    assert ((d != 0).flatten(1).sum(1) == 5).all()
    torch.testing.assert_close(tm.norm_of(d), torch.ones(4))


def _l1_projection_reference(v: np.ndarray, eps: float) -> np.ndarray:
    """Bisection on the soft-threshold θ: argmin ‖w - v‖₂ s.t. ‖w‖₁ ≤ ε."""
    if np.abs(v).sum() <= eps:
        return v
    lo, hi = 0.0, np.abs(v).max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(np.abs(v) - mid, 0).sum() > eps:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(np.abs(v) - hi, 0)


@settings(max_examples=50, deadline=None)
@given(v=arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 12)), elements=st.floats(-5, 5)), eps=st.floats(0.01, 5))
def test_l1_projection_is_the_euclidean_projection(v: np.ndarray, eps: float) -> None:
    ours = ThreatModel("l1", eps).geometry.project_ball(torch.from_numpy(v), eps).numpy()
    for row, out in zip(v, ours, strict=True):
        np.testing.assert_allclose(out, _l1_projection_reference(row, eps), atol=1e-7)


@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.floats(0.01, 3.0), scale=st.floats(0.0, 5.0))
def test_projection_lands_inside_and_is_idempotent(norm: str, seed: int, eps: float, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    x_adv = x + scale * torch.randn(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    tm = ThreatModel(norm, eps)
    p = tm.project(x_adv, x)
    assert tm.contains(p, x, atol=1e-9).all()
    torch.testing.assert_close(tm.project(p, x), p)


@pytest.mark.parametrize("norm", NORMS)
def test_random_init_inside_ball_and_seeded(norm: str) -> None:
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    tm = ThreatModel(norm, 0.5)
    a = tm.random_init(x, torch.Generator().manual_seed(1))
    b = tm.random_init(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert tm.contains(a, x, atol=1e-9).all()
    assert (a != x).any()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_invalid_eps_rejected(bad: float) -> None:
    with pytest.raises(ConfigError):
        ThreatModel("linf", bad)


def test_unknown_norm_and_oversized_eps_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown norm"):
        ThreatModel("l7", 0.1)
    with pytest.raises(ConfigError, match="exceeds"):
        ThreatModel("linf", 1.5).check_fits((1, 28, 28))
    ThreatModel("l2", 27.9).check_fits((1, 28, 28))  # sqrt(784) = 28 is the box diameter
    with pytest.raises(ConfigError):
        ThreatModel("l2", 28.1).check_fits((1, 28, 28))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 2.2e-16, 1.0, 1e30])
def test_l2_direction_is_unit_even_for_vanishing_or_huge_gradients(scale: float) -> None:
    """A confidently classified example can have an input gradient of ~1e-20: its ℓ2 step must still have length ε."""
    g = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * scale
    d = ThreatModel("l2", 1.0).ascent_direction(g)
    torch.testing.assert_close(ThreatModel("l2", 1.0).norm_of(d), torch.ones(4), rtol=1e-5, atol=1e-6)
    assert torch.equal(ThreatModel("l2", 1.0).ascent_direction(torch.zeros(2, 3)), torch.zeros(2, 3))
