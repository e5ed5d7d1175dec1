"""Szegedy et al.'s box-constrained L-BFGS attack (ICLR 2014), the original adversarial example.

For a target class t it solves, per example,

    minimise  c·‖r‖₂² + CE(f(x + r), t)   subject to  x + r ∈ [lo, hi]^D

with scipy's L-BFGS-B (the box is its bound constraint), and searches ``c`` per example: a
success (label ≠ y) means a larger c (a smaller r) may still work, a failure means c was too
large. ``c`` moves by ×10 until bracketed, then by geometric bisection. The default target is
the most likely wrong class at x. The smallest successful r is returned (x where none).

The whole batch is one L-BFGS-B problem: the objective is a sum of independent per-example
terms, so its minimiser is the per-example minimisers.

Example:
    >>> x_adv = lbfgs(model, x, y, search_steps=6)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, minimize
from torch import nn

from robustopt.threat.perturb import frozen_parameters, preserve_state

Tensor = torch.Tensor


def _solve(model: nn.Module, x: Tensor, target: Tensor, c: Tensor, bounds: tuple[float, float], max_iter: int) -> Tensor:
    """argmin_r Σ_i c_i‖r_i‖² + CE(f(x_i + r_i), t_i) over the box; returns x + r (B, ...)."""
    shape = x.shape

    def fun(r_flat: np.ndarray) -> tuple[float, np.ndarray]:
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
    *,
    target: Tensor | None = None,
    search_steps: int = 6,
    c_init: float = 1.0,
    max_iter: int = 100,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Box-constrained L-BFGS; x (B, C, H, W), y (B,) -> x_adv (B, C, H, W)."""
    x = x.detach()
    with preserve_state(model), frozen_parameters(model):
        with torch.no_grad():
            logits = model(x).float()
        if target is None:
            target = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
        best_d = torch.where(logits.argmax(1) != y, 0.0, float("inf")).to(x.device)
        best_x = x.clone()
        c = torch.full((len(y),), c_init, device=x.device)
        c_lo, c_hi = torch.zeros_like(c), torch.full_like(c, float("inf"))
        for _ in range(search_steps):
            x_adv = _solve(model, x, target, c, bounds, max_iter)
            with torch.no_grad():
                ok = model(x_adv).argmax(1) != y
            d = (x_adv - x).flatten(1).norm(dim=1)
            better = ok & (d < best_d)
            best_x[better], best_d = x_adv[better], torch.where(better, d, best_d)
            c_lo, c_hi = torch.where(ok, torch.maximum(c_lo, c), c_lo), torch.where(ok, c_hi, torch.minimum(c_hi, c))
            c = torch.where(c_lo == 0, c / 10, torch.where(torch.isinf(c_hi), c * 10, (c_lo * c_hi).sqrt()))
    return best_x
