"""Szegedy et al.'s box-constrained L-BFGS attack, the original adversarial example.

For a target class t it solves, per example,

    minimise  c·‖r‖₂² + CE(f(x + r), t)   subject to  x + r ∈ [lo, hi]^D

with scipy's L-BFGS-B (the box is its bound constraint), and searches ``c`` per example
(:class:`~robustopt.evaluation.attacks._common.ConstantSearch`): a success (label ≠ y) means a
larger c (a smaller r) may still work, a failure means c was too large. ``c`` moves by ×10
until bracketed, then by geometric bisection. The default target is the most likely wrong
class at x. The smallest successful r is kept (x where none), then projected onto the threat.

The whole batch is one L-BFGS-B problem: the objective is a sum of independent per-example
terms, so its minimiser is the per-example minimisers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, minimize
from torch import nn

from robustopt.evaluation.attacks._common import ConstantSearch, target_classes
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import attack_state

Tensor = torch.Tensor


def _solve(model: nn.Module, x: Tensor, target: Tensor, c: Tensor, bounds: tuple[float, float], max_iter: int) -> Tensor:
    """argmin_r Σ_i c_i‖r_i‖² + CE(f(x_i + r_i), t_i) over the box; returns x + r (B, ...)."""
    shape = x.shape

    def fun(r_flat: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.enable_grad():
            r = torch.from_numpy(r_flat).to(x.device, x.dtype).view(shape).requires_grad_(True)
            loss = (c * r.flatten(1).pow(2).sum(1)).sum() + F.cross_entropy(model(x + r).float(), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, r)
        return float(loss.detach()), grad.detach().cpu().double().numpy().ravel()

    x_np = x.detach().cpu().double().numpy().ravel()
    box = Bounds(bounds[0] - x_np, bounds[1] - x_np)
    res = minimize(fun, np.zeros_like(x_np), jac=True, method="L-BFGS-B", bounds=box, options={"maxiter": max_iter})
    r = torch.from_numpy(np.clip(res.x, box.lb, box.ub)).to(x.device, x.dtype).view(shape)
    return (x + r).clamp(*bounds)


def lbfgs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    search_steps: int = 6,
    c_init: float = 1.0,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Box-constrained L-BFGS towards a target class; the smallest successful point, projected onto the threat.

    Paper: Szegedy et al., "Intriguing properties of neural networks", ICLR 2014.

    Distance: ℓ2 (a threat with another norm gets the ℓ2-minimal point projected onto its ball).

    Arguments:
        steps (int): L-BFGS-B iterations per value of c (scipy's ``maxiter``); one iteration
            takes one or a few forward and backward passes (line search). Default 100.
        search_steps (int): values of c tried. Default 6.
        c_init (float): the first c. Default 1.0.
        target (Tensor): target classes (B,); default the most likely wrong class at x.
        generator: accepted for the protocol; the attack is deterministic.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = lbfgs(model, x, y, ThreatModel("l2", 1.0), steps=5, search_steps=2)
        >>> bool(ThreatModel("l2", 1.0).contains(x_adv, x).all())
        True
    """
    x = x.detach()
    with attack_state(model, "lbfgs"):
        with torch.no_grad():
            wrong = model(x).argmax(1) != y
        target = target_classes(model, x, y, 1)[:, 0] if target is None else target
        best_d = torch.where(wrong, 0.0, float("inf")).to(x.device)
        best_x = x.clone()
        search = ConstantSearch(c_init, x, success_at_larger=False, geometric=True)
        for _ in range(search_steps):
            x_adv = _solve(model, x, target, search.c, threat.bounds, steps)
            with torch.no_grad():
                ok = model(x_adv).argmax(1) != y
            d = (x_adv - x).flatten(1).norm(dim=1)
            better = ok & (d < best_d)
            best_x[better], best_d = x_adv[better], torch.where(better, d, best_d)
            search.update(ok)
    return threat.project(best_x, x)


ATTACKS = {"lbfgs": lbfgs}
