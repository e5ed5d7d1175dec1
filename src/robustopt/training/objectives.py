"""Training methods: what one minibatch does. The epoch loop in :mod:`robustopt.training.loop` is shared.

All adversarial methods minimise ``α·J(x) + (1 − α)·J(x̃)`` with ``x̃`` from the threat model:

* ``standard``: α = 1 (no perturbation is built).
* ``goodfellow``: α = 0.5 by default, one first-order step (FGSM training, Goodfellow et al. 2015).
* ``robust``: α = 0 by default, one first-order step: Algorithm 1 of Shaham et al.
* ``pgd``: multi-step projected ascent from a random start (Madry et al. 2018).
* ``fast``: one step of size 1.25ε from a random start (Wong et al. 2020).
* ``free``: each minibatch is replayed ``m`` times; every backward pass gives both the weight
  gradient and the input gradient, and the perturbation is carried over (Shafahi et al. 2019).

The perturbation pass computes input gradients only (see :func:`robustopt.threat.perturb.perturb`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import ascend, perturb
from robustopt.training.config import TrainConfig

Tensor = torch.Tensor


@dataclass
class StepContext:
    """What a training step needs; ``state`` holds tensors a method carries between batches."""

    model: nn.Module  # possibly DDP/compiled: used for the weight update
    attack_model: nn.Module  # the plain module: used for the inner maximisation
    optimizer: torch.optim.Optimizer
    threat: ThreatModel
    cfg: TrainConfig
    generator: torch.Generator
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    state: dict[str, Tensor] = field(default_factory=dict)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.amp_dtype)


def _update(ctx: StepContext, loss: Tensor, params: list[Tensor] | None = None) -> None:
    """Backward and one optimiser step; ``params`` limits the backward pass to the weights (skips ∇ₓ)."""
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward(inputs=params)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        loss.backward(inputs=params)
        ctx.optimizer.step()


def adversarial_step(ctx: StepContext, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """One optimiser step on ``α·J(x) + (1 − α)·J(x̃)``. Returns (loss, logits of the trained-on batch)."""
    cfg = ctx.cfg
    alpha = 1.0 if cfg.method == "standard" else cfg.clean_weight
    random_start = cfg.method in ("pgd", "fast")
    if 0.0 < alpha < 1.0 and cfg.inner_steps == 1 and not random_start:
        return _single_step_mixed(ctx, x, y, alpha)
    with ctx.autocast():
        x_adv = None
        if alpha < 1.0:
            x_adv = perturb(
                ctx.attack_model,
                x,
                y,
                ctx.threat,
                steps=cfg.inner_steps,
                step_size=cfg.inner_step_size,
                random_start=random_start,
                generator=ctx.generator,
            )
        loss = torch.zeros((), device=x.device)
        logits = None
        if alpha > 0.0:
            logits = ctx.model(x)
            loss = loss + alpha * F.cross_entropy(logits.float(), y)
        if x_adv is not None:
            logits = ctx.model(x_adv)
            loss = loss + (1.0 - alpha) * F.cross_entropy(logits.float(), y)
    _update(ctx, loss)
    assert logits is not None
    return float(loss.detach()), logits.detach()


def _single_step_mixed(ctx: StepContext, x: Tensor, y: Tensor, alpha: float) -> tuple[float, Tensor]:
    """Goodfellow-style ``α·J(x) + (1 − α)·J(x + ε·d(∇ₓJ(x)))`` with one forward pass of x, not two.

    The clean term's forward pass already holds ∇ₓJ(x): it is taken with ``autograd.grad``
    (input only, graph kept), so the perturbation costs a backward pass to the input and no
    extra forward. Same gradient as :func:`~robustopt.threat.perturb.perturb` with ``steps=1`` from x
    (a dropout net sees one mask for both, which the two-pass version does not)."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    x_req = x.detach().requires_grad_(True)
    with ctx.autocast():
        per_example = F.cross_entropy(ctx.model(x_req).float(), y, reduction="none")
        (grad,) = torch.autograd.grad(per_example.sum(), x_req, retain_graph=True)
        x_adv = ascend(ctx.threat, x, x, grad, ctx.cfg.inner_step_size or ctx.threat.eps, iterative=False).detach()
        logits = ctx.model(x_adv)
        loss = alpha * per_example.mean() + (1.0 - alpha) * F.cross_entropy(logits.float(), y)
    _update(ctx, loss, params)
    return float(loss.detach()), logits.detach()


def free_step(ctx: StepContext, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Shafahi et al.'s "free" adversarial training: m replays, one backward pass each.

    Each backward pass yields ∇_θ (used for the optimiser step) and ∇ₓ (used for an ascent
    step on δ, which persists across replays and minibatches).
    """
    delta = ctx.state.get("free_delta")
    if delta is None or delta.shape != x.shape:
        delta = torch.zeros_like(x)
    alpha = ctx.cfg.inner_step_size or ctx.threat.eps
    loss_value, logits = 0.0, None
    for _ in range(ctx.cfg.replays):
        x_adv = ctx.threat.project(x + delta, x).requires_grad_(True)
        with ctx.autocast():
            logits = ctx.model(x_adv)
            loss = F.cross_entropy(logits.float(), y)
        _update(ctx, loss)  # the same backward fills x_adv.grad
        grad = x_adv.grad if ctx.scaler is None else x_adv.grad / ctx.scaler.get_scale()
        delta = ascend(ctx.threat, x_adv.detach(), x, grad, alpha, iterative=True) - x
        loss_value = float(loss.detach())
    ctx.state["free_delta"] = delta.detach()
    assert logits is not None
    return loss_value, logits.detach()


def train_step(ctx: StepContext, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Dispatch on the method: the only per-method branch in training."""
    return free_step(ctx, x, y) if ctx.cfg.method == "free" else adversarial_step(ctx, x, y)
