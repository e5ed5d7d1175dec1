"""Training objectives: what one minibatch minimises, usable in any training loop.

:func:`robust_loss` returns a scalar whose backward pass gives the weight gradients of the
chosen objective. Its inner maximisation runs through :func:`robustopt.threat.perturb`: input
gradients only, BatchNorm statistics untouched, train/eval mode left as found.

With ``J`` the per-example cross-entropy and ``x̃`` the inner maximiser in the threat model:

* ``standard``:   ``J(x)``.
* ``goodfellow``: ``α·J(x) + (1 − α)·J(x + ε·d(∇ₓJ))``, α = 0.5 (Goodfellow et al. 2015).
* ``robust``:     ``J(x̃)`` with x̃ the first-order closed form: Algorithm 1 of Shaham et al.
  (arXiv 1511.05432), any norm; ``α`` mixes in the clean loss.
* ``pgd``:        ``J(x̃)``, x̃ by projected ascent from a random start (Madry et al. 2018).
* ``fast``:       one step of 1.25ε from a uniform random start (Wong et al. 2020).
* ``trades``:     ``J(x) + β·KL(p(x) ‖ p(x̃))``, x̃ maximising that KL from ``x + 0.001·N(0, I)``
  (Zhang et al. 2019), β = 6.
* ``mart``:       ``BCE(p(x̃), y) + β·KL(p(x) ‖ p(x̃))·(1 − p_y(x))`` (Wang et al. 2020), β = 6,
  with ``BCE = −log p_y(x̃) − log(1 − max_{k≠y} p_k(x̃))`` and x̃ from PGD on J.

``free`` (Shafahi et al. 2019) replays each minibatch and updates the weights inside the inner
loop, so it is a method of :func:`robustopt.fit`, not an objective: see :func:`free_step`.

The inner maximisation and the outer loss live apart in :mod:`robustopt.training.adversarial`; a label
smoothing ``s`` replaces J by its smoothed form in the outer loss only.

Shapes: x (B, ...) inside ``threat.bounds``, y (B,) int64 class indices, logits (B, K).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.errors import ConfigError
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import (
    ascend,
    check_grad_mode,
    check_inputs,
    check_labels,
    check_module,
    check_threat,
    preserve_state,
)
from robustopt.training.adversarial import (
    Objective,
    adversarial_examples,
    cross_entropy,
    kl_per_example,
    outer_loss,
    stateless,
    trades_shared,
)

__all__ = ["METHODS", "Objective", "StepContext", "kl_per_example", "make_objective", "objective_loss", "robust_loss",
           "train_step"]  # fmt: skip

Tensor = torch.Tensor

OBJECTIVES = ("standard", "goodfellow", "robust", "pgd", "fast", "trades", "mart")
CERTIFIED = ("ibp", "crown-ibp", "gaussian")  # robustopt.certify.training: scheduled by training progress
METHODS = (*OBJECTIVES, *CERTIFIED, "free")
DEFAULT_BETA = {"trades": 6.0, "mart": 6.0}


def make_objective(
    method: str,
    threat: ThreatModel,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    sigma: float | None = None,
    label_smoothing: float = 0.0,
) -> Objective:
    """Validate a method's options and fill in the defaults of its paper.

    Defaults: α = 0.5 for goodfellow, else 0; β = 6; steps 10 for pgd/trades/mart, else 1;
    step size ε for one step, 1.25ε for fast, 2.5ε/steps for PGD-style methods; no label smoothing."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if alpha is None:
        alpha = 0.5 if method == "goodfellow" else 0.0
    beta = DEFAULT_BETA.get(method, 0.0) if beta is None else beta
    steps = (10 if method in ("pgd", "trades", "mart") else 1) if steps is None else steps
    if step_size is None:
        step_size = 1.25 * threat.eps if method == "fast" else threat.default_step_size(steps)
    _check_option("alpha", alpha, 0.0, 1.0)
    _check_option("beta", beta, 0.0, math.inf)
    _check_option("step-size", step_size, 0.0, math.inf)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a whole number >= 1, got {steps!r}")
    if method not in ("standard",) and threat.eps <= 0:
        raise ConfigError(f"method {method!r} needs eps > 0, got {threat.eps:g}")
    if sigma is not None:
        _check_option("sigma", sigma, 0.0, math.inf)
    _check_option("label-smoothing", label_smoothing, 0.0, 0.999)
    random_start = method in ("pgd", "fast")
    return Objective(method, float(alpha), float(beta), int(steps), float(step_size), random_start, sigma, float(label_smoothing))


def _check_option(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi) or math.isnan(value):
        bound = f"between {lo:g} and {hi:g}" if math.isfinite(hi) else f">= {lo:g}"
        raise ConfigError(f"{name} must be a number {bound}, got {value!r}")


def robust_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    method: str = "robust",
    *,
    alpha: float | None = None,
    beta: float | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    attack_model: nn.Module | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The scalar training loss of ``method`` on the batch (x, y); call ``.backward()`` on it.

    Drop it into any loop (plain PyTorch, Lightning, Accelerate)::

        loss = robust_loss(model, x, y, ThreatModel("linf", 8 / 255), "trades", beta=6.0)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

    Args:
        model: maps inputs in ``threat.bounds`` to logits (B, K); used for the loss. Inside ``torch.no_grad()``
            (a validation step) the inner maximisation still gets its input gradients and the loss carries no graph;
            ``torch.inference_mode()`` is refused with a clear error.
        x: (B, ...) inputs; y: (B,) labels.
        threat: the norm, ε and domain of the inner maximisation.
        method: one of ``standard, goodfellow, robust, pgd, fast, trades, mart``.
        alpha, beta, steps, step_size: the method's options (defaults: :func:`make_objective`).
        generator: seeds random starts (reproducible training).
        attack_model: the module the inner maximisation differentiates (default ``model``; pass the
            plain module when ``model`` is a DDP or compiled wrapper).
        label_smoothing: ``s`` of the outer cross-entropy, as ``F.cross_entropy(..., label_smoothing=s)``;
            the inner maximisation is never smoothed.
    """
    if method == "free":
        raise ConfigError("method 'free' replays minibatches and updates inside its inner loop; use robustopt.fit for it")
    check_module(model, "robust_loss")
    check_threat(threat, "robust_loss")
    check_grad_mode("robust_loss")
    check_inputs(x, y, threat, where="robust_loss")
    _check_label_range(model, x, y)
    obj = make_objective(
        method, threat, alpha=alpha, beta=beta, steps=steps, step_size=step_size, label_smoothing=label_smoothing
    )
    loss, _ = objective_loss(obj, model, x, y, threat, generator=generator, attack_model=attack_model)
    return loss


def _check_label_range(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Labels against the model's class count, from one example in eval mode (BatchNorm needs no batch)."""
    with torch.no_grad(), preserve_state(model):
        model.eval()
        k = model(x[:1])
    check_labels(k.expand(len(y), -1) if isinstance(k, Tensor) and k.dim() == 2 else k, y, "robust_loss")


def objective_loss(
    obj: Objective,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    generator: torch.Generator | None = None,
    attack_model: nn.Module | None = None,
    check: bool = False,
    progress: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(scalar loss, detached logits of the batch the accuracy is reported on).

    ``check`` validates x (finite, inside the threat's bounds) first; fit validated its data up front."""
    attacker = model if attack_model is None else attack_model
    if check:
        check_inputs(x, y, threat, where="robust_loss")
    if obj.method in CERTIFIED:  # progress ∈ [0, 1] drives the ε ramp and the κ/β schedules
        from robustopt.certify.training import scheduled_loss

        return scheduled_loss(obj.method, model, x, y, threat, progress, sigma=obj.sigma, generator=generator)
    if 0.0 < obj.clean_weight < 1.0 and obj.steps == 1 and not obj.random_start and obj.method not in ("trades", "mart"):
        return _single_step_mixed(obj, model, x, y, threat, obj.clean_weight)
    if obj.method == "trades" and model is attacker and stateless(model):
        return trades_shared(obj, model, x, y, threat, generator)
    return outer_loss(obj, model, x, adversarial_examples(obj, attacker, x, y, threat, generator), y)


def _single_step_mixed(
    obj: Objective, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, alpha: float
) -> tuple[Tensor, Tensor]:
    """Goodfellow-style ``α·J(x) + (1 − α)·J(x + ε·d(∇ₓJ(x)))`` with one forward pass of x, not two.

    The clean term's graph already holds ∇ₓJ(x): it is taken with ``autograd.grad`` w.r.t. the
    input only (graph kept), so the perturbation costs a backward pass to the input and no extra
    forward. The same gradient as ``perturb(steps=1)`` from x."""
    x_req = x.detach().requires_grad_(True)
    clean = model(x_req).float()
    per_example = F.cross_entropy(clean, y, reduction="none")  # the attack's loss: never smoothed
    (grad,) = torch.autograd.grad(per_example.sum(), x_req, retain_graph=True)
    x_adv = ascend(threat, x.detach(), x.detach(), grad, obj.step_size, iterative=False).detach()
    logits = model(x_adv)
    clean_loss = per_example.mean() if obj.label_smoothing == 0 else cross_entropy(obj, clean, y)
    loss = alpha * clean_loss + (1.0 - alpha) * cross_entropy(obj, logits, y)
    return loss, logits.detach()


# ---------------------------------------------------------------------------- the optimiser step


@dataclass
class StepContext:
    """What one training step needs; ``state`` holds tensors a method carries between batches."""

    model: nn.Module  # possibly DDP/compiled: used for the weight update
    attack_model: nn.Module  # the plain module: used for the inner maximisation
    optimizer: torch.optim.Optimizer
    threat: ThreatModel
    objective: Objective
    generator: torch.Generator
    replays: int = 1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    state: dict[str, Tensor] = field(default_factory=dict)
    progress: float = 1.0  # fraction of training done, set by the loop before each step (certified methods' schedules)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.attack_model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.amp_dtype)


def update(ctx: StepContext, loss: Tensor) -> None:
    """Backward (to the weights only) and one optimiser step, with AMP scaling and clipping."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    ctx.optimizer.zero_grad(set_to_none=True)
    (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward(inputs=params)
    _finish_step(ctx)


def objective_step(ctx: StepContext, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """One optimiser step on the objective. Returns (loss, logits of the batch the accuracy is on)."""
    with ctx.autocast():
        loss, logits = objective_loss(
            ctx.objective,
            ctx.model,
            x,
            y,
            ctx.threat,
            generator=ctx.generator,
            attack_model=ctx.attack_model,
            progress=ctx.progress,
        )
    update(ctx, loss)
    return float(loss.detach()), logits


def free_step(ctx: StepContext, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Shafahi et al.'s "free" adversarial training: ``replays`` passes, one backward pass each.

    Each backward pass yields ∇_θ (used for the optimiser step) and ∇ₓ (used for an ascent step
    on δ, which persists across replays and minibatches).
    """
    delta = ctx.state.get("free_delta")
    if delta is None or delta.shape != x.shape:
        delta = torch.zeros_like(x)
    loss_value, logits = 0.0, None
    for _ in range(ctx.replays):
        x_adv = ctx.threat.project(x + delta, x).requires_grad_(True)
        with ctx.autocast():
            logits = ctx.model(x_adv)
            loss = cross_entropy(ctx.objective, logits, y)
        ctx.optimizer.zero_grad(set_to_none=True)
        (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()  # fills the weights' and x_adv's .grad
        grad = x_adv.grad if ctx.scaler is None else x_adv.grad / ctx.scaler.get_scale()
        _finish_step(ctx)
        delta = ascend(ctx.threat, x_adv.detach(), x, grad, ctx.objective.step_size, iterative=True) - x
        loss_value = float(loss.detach())
    ctx.state["free_delta"] = delta.detach()
    assert logits is not None
    return loss_value, logits.detach()


def _finish_step(ctx: StepContext) -> None:
    """The optimiser step after a backward pass already made (clipping and AMP unscaling included)."""
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    if ctx.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in ctx.model.parameters() if p.requires_grad], ctx.grad_clip)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()


def train_step(ctx: StepContext, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Dispatch on the method: the only per-method branch of the loop."""
    return free_step(ctx, x, y) if ctx.objective.method == "free" else objective_step(ctx, x, y)
