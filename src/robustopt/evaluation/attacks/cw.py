"""Carlini–Wagner ℓ2 (IEEE S&P 2017): minimal ℓ2 perturbation through a smooth change of variables.

With ``x' = lo + (hi − lo)(tanh(w) + 1)/2`` (always inside the box) it minimises, per example,

    ‖x' − x‖₂² + c · max(z_y − max_{i≠y} z_i, −κ)

with Adam, and binary-searches ``c`` per example: after a success ``c`` shrinks towards the
largest failure, after a failure it grows (×10 until a first success). The smallest
misclassified ``x'`` ever seen is returned (x itself where nothing was found).

Example:
    >>> x_adv = cw_l2(model, x, y, steps=100, search_steps=5)
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.evaluation.attacks.losses import margin
from robustopt.threat.perturb import frozen_parameters, preserve_state

Tensor = torch.Tensor


def _to_tanh(x: Tensor, bounds: tuple[float, float]) -> Tensor:
    lo, hi = bounds
    return torch.atanh(((x - lo) / (hi - lo) * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))


def _from_tanh(w: Tensor, bounds: tuple[float, float]) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * (torch.tanh(w) + 1) / 2


def _optimise(model: nn.Module, x: Tensor, y: Tensor, c: Tensor, steps: int, lr: float, kappa: float, bounds, best) -> Tensor:
    """One Adam run at fixed c (B,); updates ``best = (dist², x)`` in place; returns success (B,)."""
    w = _to_tanh(x, bounds).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    success = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        x_adv = _from_tanh(w, bounds)
        logits = model(x_adv)
        d2 = (x_adv - x).flatten(1).pow(2).sum(1)
        loss = (d2 + c * margin(logits, y).clamp_min(-kappa)).sum()
        (grad,) = torch.autograd.grad(loss, w)
        w.grad = grad
        opt.step()
        with torch.no_grad():
            fooled = logits.argmax(1) != y
            better = fooled & (d2 < best[0])
            best[0][better] = d2.detach()[better]
            best[1][better] = x_adv.detach()[better]
            success |= fooled
    return success


def cw_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 100,
    search_steps: int = 5,
    c_init: float = 1.0,
    lr: float = 0.05,
    kappa: float = 0.0,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """CW-ℓ2; x (B, C, H, W), y (B,) -> x_adv (B, C, H, W) in the box."""
    x = x.detach()
    best = [torch.full((len(y),), float("inf"), device=x.device), x.clone()]
    c = torch.full((len(y),), c_init, device=x.device)
    c_lo, c_hi = torch.zeros_like(c), torch.full_like(c, float("inf"))
    with preserve_state(model), frozen_parameters(model):
        for _ in range(search_steps):
            ok = _optimise(model, x, y, c, steps, lr, kappa, bounds, best)
            c_hi = torch.where(ok, torch.minimum(c_hi, c), c_hi)
            c_lo = torch.where(ok, c_lo, torch.maximum(c_lo, c))
            c = torch.where(torch.isinf(c_hi), c * 10, (c_lo + c_hi) / 2)
    return best[1]
