"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): certified ℓ2 radii for any classifier.

The smoothed classifier is ``g(x) = argmax_c P(f(x + σ·N(0, I)) = c)``. CERTIFY (Cohen et al., Alg. 1):

1. guess ``ĉ`` as the most frequent class of ``f`` on ``n0`` noisy copies of x;
2. count ``n_A``, how many of ``n`` fresh noisy copies ``f`` assigns to ``ĉ``;
3. ``p_A = `` the one-sided Clopper–Pearson lower confidence bound of level ``1 − α`` on ``P(f(x + σε) = ĉ)``;
4. if ``p_A < 1/2`` abstain, else ``g`` returns ``ĉ`` at every point within ℓ2 radius ``R = σ·Φ⁻¹(p_A)``
   of x; the claim fails with probability at most α per example.

Certified accuracy at radius r is the fraction of examples with ``ĉ = y`` and ``R > r`` (``R ≥ 0`` at r = 0).
Randomness: one seeded ``torch.Generator``; the result is reproducible for a given seed and batch size.
Cost: ``n + n0`` forward passes per example (Cohen et al. use n = 100 000; 10 000 is the default here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm as normal_dist
from torch import nn

from robustopt.errors import ConfigError
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import preserve_state

Tensor = torch.Tensor
ABSTAIN = -1
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 − α`` lower confidence bound on a binomial proportion: the α quantile of Beta(k, n − k + 1)."""
    if successes <= 0:
        return 0.0
    return float(beta_dist.ppf(alpha, successes, trials - successes + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """``σ·Φ⁻¹(p_A)``, or -1 (abstain) when ``p_A < 1/2``."""
    return sigma * float(normal_dist.ppf(p_lower)) if p_lower >= 0.5 else -1.0


@dataclass(frozen=True)
class SmoothingOutput:
    prediction: Tensor  # (N,) ĉ, or ABSTAIN
    radius: Tensor  # (N,) certified radius of the prediction, -1 when abstaining
    correct: Tensor  # (N,) prediction == y
    verified: Tensor  # (N,) correct and radius > threat.eps
    certified_accuracy: dict[float, float]
    options: dict[str, Any] = field(default_factory=dict)


def smoothed_certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    sigma: float | None = None,
    n: int = 10_000,
    n0: int = 100,
    alpha: float = 0.001,
    radii: Sequence[float] = DEFAULT_RADII,
    seed: int = 0,
    batch_size: int = 500,
) -> SmoothingOutput:
    """CERTIFY on every example of (x, y); ``threat`` must be ℓ2 (its ε is the radius of the verified mask)."""
    sigma = _check(threat, sigma, n, n0, alpha, radii)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    preds, radius = [], []
    with preserve_state(model), torch.no_grad():
        model.eval()
        for xi in x:
            guess = int(_counts(model, xi, n0, sigma, batch_size, gen).argmax())
            n_a = int(_counts(model, xi, n, sigma, batch_size, gen)[guess])
            r = certified_radius(clopper_pearson_lower(n_a, n, alpha), sigma)
            preds.append(guess if r >= 0 else ABSTAIN)
            radius.append(r)
    prediction, rad = torch.tensor(preds, device=y.device), torch.tensor(radius, dtype=torch.float64, device=y.device)
    correct = prediction == y
    acc = {float(r): float((correct & ((rad > r) | ((r == 0) & (rad >= 0)))).float().mean()) for r in radii}
    options = {"sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "seed": seed}
    return SmoothingOutput(prediction, rad, correct, correct & (rad > threat.eps), acc, options)


def _check(threat: ThreatModel, sigma: float | None, n: int, n0: int, alpha: float, radii: Sequence[float]) -> float:
    if threat.norm != "l2":
        raise ConfigError(f"certify: randomized smoothing certifies l2 radii, got norm {threat.norm!r}; use --norm l2")
    if sigma is None or isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"certify: smoothing needs a noise level sigma > 0, got {sigma!r}")
    for name, value in (("n", n), ("n0", n0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"certify: {name} must be a whole number >= 1, got {value!r}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"certify: alpha must be between 0 and 1, got {alpha!r}")
    if any(not (math.isfinite(r) and r >= 0) for r in radii):
        raise ConfigError(f"certify: radii must be finite and >= 0, got {list(radii)}")
    return float(sigma)


def _counts(model: nn.Module, x: Tensor, num: int, sigma: float, batch_size: int, gen: torch.Generator) -> Tensor:
    """Class counts (K,) of ``model`` on ``num`` copies of x (C, H, W) plus σ·N(0, I) noise."""
    counts: Tensor | None = None
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        noisy = x.unsqueeze(0) + sigma * torch.randn((b, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
        logits = model(noisy)
        batch = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
        counts = batch if counts is None else counts + batch
    assert counts is not None
    return counts
