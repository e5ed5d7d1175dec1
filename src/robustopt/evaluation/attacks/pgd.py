"""Projected gradient descent (BIM/PGD) with random restarts, for every norm.

Madry et al. (2018); BIM is Kurakin et al. (2017) without the random start. Each iteration
``x ← Π_{B(x₀,ε) ∩ box}(x + α·d(∇ₓL))`` with ``d`` the threat's (iterative) steepest-ascent
direction: ``sign`` for ℓ∞, ``g/‖g‖₂`` for ℓ2, a sparse top-k step for ℓ1. Unlike
:func:`robustopt.threat.perturb.perturb`, which training uses and which returns the last iterate,
the attack keeps per example the *worst case over every iterate of every restart*
(:class:`~robustopt.evaluation.attacks._common.WorstCase`), so more steps or restarts can only help it.

Arguments: ``steps`` (default 40), ``restarts`` (default 1), ``step_size`` (default
2.5ε/steps), ``loss`` ("ce", "dlr" or "margin"), ``random_start`` (default True),
``generator`` (seeds the starts), ``eps`` (optional per-example radii (B,), used by the
binary searches of :mod:`robustopt.evaluation.stability`).

Example:
    >>> x_adv = pgd(model, x, y, ThreatModel("linf", 0.3), steps=40, restarts=2, loss="dlr")
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.errors import ConfigError
from robustopt.evaluation.attacks._common import WorstCase, project, radii, random_init
from robustopt.evaluation.attacks.losses import get_loss
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import LossFn, check_step_size, frozen_parameters, input_gradient, preserve_state

Tensor = torch.Tensor


def _one_run(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, eps: Tensor, x0: Tensor, steps: int, alpha: Tensor, loss_fn
):
    """One PGD trajectory from x0; returns its per-example worst case over all iterates."""
    best = WorstCase(x0)
    x_adv = x0
    a = alpha.reshape(-1, *([1] * (x.dim() - 1)))
    for _ in range(steps):
        grad, logits = input_gradient(model, x_adv, y, loss_fn)
        best.update(x_adv, loss_fn(logits, y), logits.argmax(1) != y)
        x_adv = project(threat, x_adv + a * threat.ascent_direction(grad, iterative=True), x, eps)
    with torch.no_grad():
        logits = model(x_adv)
    best.update(x_adv, loss_fn(logits, y), logits.argmax(1) != y)
    return best


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 40,
    restarts: int = 1,
    step_size: float | None = None,
    loss: str | LossFn = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """PGD with restarts; x (B, C, H, W), y (B,) -> x_adv (B, C, H, W) inside the threat model."""
    if steps < 1 or restarts < 1:
        raise ConfigError(f"pgd: steps and restarts must be >= 1, got {steps}, {restarts}")
    check_step_size(step_size, "pgd")
    loss_fn = get_loss(loss)
    x = x.detach()
    e = radii(threat, x, eps)
    alpha = e * (2.5 / steps) if step_size is None else e * (step_size / max(threat.eps, 1e-12))
    overall = WorstCase(x)
    with preserve_state(model), frozen_parameters(model):
        for r in range(restarts):
            x0 = random_init(threat, x, e, generator) if (random_start or r > 0) else x.clone()
            run = _one_run(model, x, y, threat, e, x0, steps, alpha, loss_fn)
            overall.update(run.x, run.loss, run.fooled)
    return overall.x
