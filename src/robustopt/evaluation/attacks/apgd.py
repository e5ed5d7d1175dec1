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

Example:
    >>> x_adv = apgd(model, x, y, ThreatModel("linf", 0.3), steps=100, loss="ce")
    >>> x_adv = apgd_targeted(model, x, y, ThreatModel("l2", 2.0), n_targets=9)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustopt.evaluation.attacks._common import WorstCase, project, radii, random_init
from robustopt.evaluation.attacks.losses import get_loss, targeted_dlr
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import LossFn, frozen_parameters, input_gradient, preserve_state

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
    z = project(threat, x_k + eta.view(b) * threat.ascent_direction(grad, iterative=True), x, eps)
    return project(threat, x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, eps)


def _apgd_run(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, eps: Tensor, steps: int, loss_fn: LossFn, gen):
    """One APGD trajectory with per-example step sizes η (B,); its worst case over all iterates."""
    x_k = random_init(threat, x, eps, gen)
    grad, logits = input_gradient(model, x_k, y, loss_fn)
    loss = loss_fn(logits, y)
    best = WorstCase(x_k)
    best.update(x_k, loss, logits.argmax(1) != y)
    x_max, f_max, x_prev, eta = x_k.clone(), loss.clone(), x_k.clone(), 2 * eps
    eta_at_ckpt, fmax_at_ckpt = eta.clone(), f_max.clone()
    ups = torch.zeros_like(loss)
    ckpts, last = checkpoints(steps), 0
    for k in range(steps):
        x_new = _step(threat, x, x_k, x_prev, grad, eta, eps, 1.0 if k == 0 else MOMENTUM)
        grad, logits = input_gradient(model, x_new, y, loss_fn)
        new_loss = loss_fn(logits, y)
        best.update(x_new, new_loss, logits.argmax(1) != y)
        ups += (new_loss > loss).float()
        improved = new_loss > f_max
        x_max[improved], f_max = x_new[improved], torch.where(improved, new_loss, f_max)
        x_prev, x_k, loss = x_k, x_new, new_loss
        if k + 1 in ckpts:
            stalled = (ups < RHO * (k + 1 - last)) | ((eta == eta_at_ckpt) & (f_max == fmax_at_ckpt))
            eta_at_ckpt, fmax_at_ckpt = eta.clone(), f_max.clone()
            eta = torch.where(stalled, eta / 2, eta)
            if stalled.any():  # restart the halved examples from their best point
                x_k[stalled] = x_max[stalled]
                grad = input_gradient(model, x_k, y, loss_fn)[0]  # full batch: loss_fn may hold per-example targets
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
    eps: Tensor | None = None,
) -> Tensor:
    """APGD with ``loss`` ("ce", "dlr", "margin" or a callable); worst case over restarts."""
    loss_fn = get_loss(loss)
    x = x.detach()
    e = radii(threat, x, eps)
    overall = WorstCase(x)
    with preserve_state(model), frozen_parameters(model):
        for _ in range(restarts):
            run = _apgd_run(model, x, y, threat, e, steps, loss_fn, generator)
            overall.update(run.x, run.loss, run.fooled)
    return overall.x


def apgd_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    n_targets: int = 9,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """APGD-T: targeted DLR towards each of the ``n_targets`` most likely wrong classes in turn.

    Only examples not yet fooled are attacked again; the first success is kept.
    """
    x = x.detach()
    with torch.no_grad(), preserve_state(model):
        order = model(x).float().sort(dim=1, descending=True).indices  # (B, K)
    x_adv = x.clone()
    fooled = order[:, 0] != y  # already misclassified: x itself is the worst case
    n_targets = min(n_targets, order.shape[1] - 1)
    for t in range(n_targets):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        target = order[todo, t + 1]  # the (t+1)-th most likely class; order[:, 0] is y here
        e = None if eps is None else eps[todo]
        cand = apgd(model, x[todo], y[todo], threat, steps=steps, loss=targeted_dlr(target), generator=generator, eps=e)
        with torch.no_grad(), preserve_state(model):
            hit = model(cand).argmax(1) != y[todo]
        x_adv[todo[hit]] = cand[hit]
        fooled[todo[hit]] = True
    return x_adv
