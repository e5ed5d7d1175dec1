"""Carlini–Wagner ℓ2: a minimal ℓ2 perturbation through a smooth change of variables.

With ``x' = lo + (hi − lo)(tanh(w) + 1)/2`` (always inside the box) it minimises, per example,

    ‖x' − x‖₂² + c · max(z_y − max_{i≠y} z_i, −κ)

with Adam, and searches ``c`` per example (:class:`~robustopt.evaluation.attacks._common.ConstantSearch`):
after a success ``c`` shrinks towards the largest failure, after a failure it grows (×10
until a first success). The smallest misclassified ``x'`` ever seen is kept (x itself where
nothing was found), then projected onto the threat.
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.evaluation.attacks._common import ConstantSearch
from robustopt.evaluation.attacks.losses import margin
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import attack_state

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
    threat: ThreatModel,
    *,
    steps: int = 100,
    search_steps: int = 5,
    c_init: float = 1.0,
    lr: float = 0.05,
    kappa: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Carlini–Wagner ℓ2; the smallest misclassified point found, projected onto the threat.

    Paper: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.

    Distance: ℓ2 (a threat with another norm gets the ℓ2-minimal point projected onto its ball).

    Arguments:
        steps (int): Adam steps per value of c; one step is one forward and backward pass. Default 100.
        search_steps (int): values of c tried (the binary search). Default 5.
        c_init (float): the first c. Default 1.0.
        lr (float): Adam's learning rate. Default 0.05.
        kappa (float): confidence κ of the margin term. Default 0.
        generator: accepted for the protocol; the attack is deterministic.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = cw_l2(model, x, y, ThreatModel("l2", 1.0), steps=5, search_steps=2)
        >>> bool(ThreatModel("l2", 1.0).contains(x_adv, x).all())
        True
    """
    x = x.detach()
    best = [torch.full((len(y),), float("inf"), device=x.device), x.clone()]
    search = ConstantSearch(c_init, x, success_at_larger=True, geometric=False)
    with attack_state(model, "cw"):
        for _ in range(search_steps):
            search.update(_optimise(model, x, y, search.c, steps, lr, kappa, threat.bounds, best))
    return threat.project(best[1], x)


ATTACKS = {"cw": cw_l2}
