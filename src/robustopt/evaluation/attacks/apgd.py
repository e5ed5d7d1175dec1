"""Auto-PGD (Croce & Hein, ICML 2020): PGD whose step size tunes itself.

Per example, with budget ``N`` iterations:

* start from a random point of the ball with step ``η = 2ε``;
* momentum step ``z = Π(x_k + η·d(∇L(x_k)))``,
  ``x_{k+1} = Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))`` with α = 0.75 (1 on the first step);
* checkpoints ``w_j = ⌈p_j N⌉`` with ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``;
  at each, halve η and restart from the best point so far if fewer than ρ = 75% of the steps
  since the last checkpoint raised the loss, or if neither η nor the best loss changed since
  the last checkpoint.

``d`` is the threat's steepest-ascent direction, so the same code runs ℓ∞, ℓ2 and ℓ1
(ℓ1 with sparse top-k steps). The worst case over every iterate is returned.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from robustopt.evaluation.attacks._common import over_targets, target_classes
from robustopt.evaluation.attacks.losses import get_loss, targeted_dlr
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import LossFn, WorstCase, attack_state, evaluate

Tensor = torch.Tensor
MOMENTUM, RHO = 0.75, 0.75


def checkpoints(n_iter: int) -> list[int]:
    """The iterations at which APGD may halve its step: ⌈p_j·N⌉ for the p_j above (j ≥ 1)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * n_iter, 6)) for q in p[1:] if q < 1})  # round: 0.57·100 is 57.000000001


def _step(threat: ThreatModel, x: Tensor, x_k: Tensor, x_prev: Tensor, grad: Tensor, eta: Tensor, eps: Tensor, alpha: float):
    """One momentum step: z = Π(x_k + η·d(g)), then Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))."""
    b = (-1, *([1] * (x.dim() - 1)))
    z = threat.project(x_k + eta.view(b) * threat.ascent_direction(grad, iterative=True), x, eps)
    return threat.project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, eps)


def _apgd_run(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, eps: Tensor, steps: int, loss_fn: LossFn, gen):
    """One APGD trajectory with per-example step sizes η (B,); its worst case over all iterates.

    At the floor: ``steps`` input-gradient passes and ``steps + 1`` forwards. Each iterate's loss and prediction
    come from the forward that gives its gradient; the last iterate gets a forward only (its gradient would
    never be used); a restart from the best point reuses the gradient stored with that point (``g_max``) as
    the reference implementation does, rather than recomputing it."""
    x_k = threat.random_init(x, gen, eps)
    grad, logits, loss = evaluate(model, x_k, y, loss_fn)
    best = WorstCase(x_k)
    best.update(x_k, loss, logits.argmax(1) != y)
    x_max, f_max, g_max, x_prev, eta = x_k.clone(), loss.clone(), grad.clone(), x_k.clone(), 2 * eps
    eta_at_ckpt, fmax_at_ckpt = eta.clone(), f_max.clone()
    ups = torch.zeros_like(loss)
    ckpts, last = checkpoints(steps), 0
    for k in range(steps):
        x_new = _step(threat, x, x_k, x_prev, grad, eta, eps, 1.0 if k == 0 else MOMENTUM)
        grad, logits, new_loss = evaluate(model, x_new, y, loss_fn, gradient=k + 1 < steps)
        best.update(x_new, new_loss, logits.argmax(1) != y)
        ups += (new_loss > loss).float()
        improved = new_loss > f_max
        x_max[improved], f_max = x_new[improved], torch.where(improved, new_loss, f_max)
        if grad is not None:
            g_max[improved] = grad[improved]
        x_prev, x_k, loss = x_k, x_new, new_loss
        if k + 1 in ckpts:
            stalled = (ups < RHO * (k + 1 - last)) | ((eta == eta_at_ckpt) & (f_max == fmax_at_ckpt))
            eta_at_ckpt, fmax_at_ckpt = eta.clone(), f_max.clone()
            eta = torch.where(stalled, eta / 2, eta)
            if stalled.any():  # restart the halved examples from their best point, with its gradient
                x_k[stalled] = x_max[stalled]
                if grad is not None:
                    grad[stalled] = g_max[stalled]
                loss = torch.where(stalled, f_max, loss)
            ups.zero_()
            last = k + 1
    return best


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    generator: torch.Generator | None = None,
    radius: Tensor | None = None,
) -> Tensor:
    """APGD with ``loss``; the worst case per example over every iterate of every restart.

    Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020 (Algorithm 1).

    Distance: the threat's norm (ℓ∞, ℓ2, ℓ1).

    Arguments:
        steps (int): iterations N per restart; one step is one forward and backward pass. Default 100.
        restarts (int): independent random starts. Default 1.
        loss (str | callable): ``"ce"``, ``"dlr"``, ``"margin"`` or ``(logits, y) -> (B,)``. Default ``"ce"``.
        generator (torch.Generator): seeds the random starts.
        radius (Tensor): optional per-example radii (B,) instead of ε.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = apgd(model, x, y, ThreatModel("linf", 0.1), steps=5)
        >>> x_adv.shape == x.shape
        True
    """
    loss_fn = get_loss(loss)
    x = x.detach()
    e = threat.radii(x, radius)
    overall = WorstCase(x)
    with attack_state(model, "apgd"):
        for _ in range(restarts):
            run = _apgd_run(model, x, y, threat, e, steps, loss_fn, generator)
            overall.update(run.x, run.loss, run.fooled)
    return overall.x


def _apgd_towards(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, rank: int, steps: int, generator: torch.Generator | None
) -> Tensor:
    """APGD with the targeted DLR loss towards each example's ``rank``-th most likely wrong class (0 = the most likely)."""
    target = target_classes(model, x, y, rank + 1)[:, rank]
    return apgd(model, x, y, threat, steps=steps, loss=targeted_dlr(target), generator=generator)


def apgd_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    n_targets: int = 9,
    generator: torch.Generator | None = None,
) -> Tensor:
    """APGD-T: APGD with the targeted DLR loss towards each of the ``min(n_targets, K − 1)`` most likely wrong classes in turn.

    Paper: Croce & Hein, ICML 2020 (APGD-T of AutoAttack). Each target runs only on the examples
    no earlier target broke (:func:`~robustopt.evaluation.attacks._common.over_targets`); the
    first success is kept. With K = 2 there is one target and the targeted DLR loss is the
    margin (see :mod:`~robustopt.evaluation.attacks.losses`).

    Distance: the threat's norm (ℓ∞, ℓ2, ℓ1).

    Arguments:
        steps (int): APGD iterations per target. Default 100.
        n_targets (int): how many target classes at most. Default 9.
        generator (torch.Generator): seeds the random starts.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = apgd_targeted(model, x, y, ThreatModel("l2", 0.5), steps=5, n_targets=2)
        >>> bool(ThreatModel("l2", 0.5).contains(x_adv, x).all())
        True
    """
    x = x.detach()
    with attack_state(model, "apgd-t"):
        return over_targets(model, x, y, threat, n_targets, _apgd_towards, steps=steps, generator=generator)


ATTACKS = {"apgd-ce": partial(apgd, loss="ce"), "apgd-dlr": apgd_targeted}
