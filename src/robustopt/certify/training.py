"""Certified training losses (pure functions, usable in any loop) and their schedules.

With ``m(x) ∈ R^K`` a lower bound of the margins ``z_y − z_j`` over the threat set (0 at j = y), the
*worst-case logits* are ``−m(x)``: no point of the set has a larger cross-entropy than ``CE(−m(x), y)``
(Wong & Kolter 2018; Gowal et al. 2018). The losses are

* ``ibp``: ``κ·CE(f(x), y) + (1 − κ)·CE(−m_IBP(x; ε_t), y)`` (Gowal et al. 2018, κ from 1 to 0.5);
* ``crown-ibp``: the same with ``m = β·m_CROWN-IBP + (1 − β)·m_IBP``, β from 1 to 0 and κ from 1 to 0
  (Zhang et al. 2020); the CROWN-IBP bound here is the raw backward bound (the paper's), not max(·, IBP);
* ``gaussian``: ``CE(f(x + σ·N(0, I)), y)``, the noise augmentation that randomized smoothing needs
  (Cohen et al. 2019; no clipping to the domain, as in the paper).

Schedules are functions of ``progress`` ∈ [0, 1], the fraction of training steps done: ε_t is 0 until
``start``, grows linearly to ε at ``end``, then stays; κ and β move with it. The default ramp
(0.05 → 0.3) is CROWN-IBP's MNIST schedule (warm-up 10 of 200 epochs, ramp over the next 50) as fractions.

The bounds are differentiable in the weights; BatchNorm layers enter them with their running statistics.
Shapes: x (B, ...) in ``threat.bounds``, y (B,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.certify.bounds import InputSet, crown_margins, ibp_margins, interval_bounds, margin_spec
from robustopt.certify.layers import build_graph
from robustopt.errors import ConfigError
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor
CERTIFIED_METHODS = ("ibp", "crown-ibp", "gaussian")


@dataclass(frozen=True)
class Ramp:
    """Where the ε ramp starts and ends, as fractions of training."""

    start: float = 0.05
    end: float = 0.3

    def __call__(self, progress: float) -> float:
        """0 before ``start``, linear to 1 at ``end``, 1 after."""
        if progress <= self.start:
            return 0.0
        if progress >= self.end or self.end <= self.start:
            return 1.0
        return (progress - self.start) / (self.end - self.start)


def eps_schedule(progress: float, ramp: Ramp = Ramp()) -> float:
    """Fraction of the target ε used at ``progress``."""
    return ramp(progress)


def kappa_schedule(progress: float, method: str = "ibp", ramp: Ramp = Ramp()) -> float:
    """Weight of the clean loss: 1 → 0.5 for ibp (Gowal et al.), 1 → 0 for crown-ibp (Zhang et al.)."""
    end = 0.5 if method == "ibp" else 0.0
    return 1.0 + (end - 1.0) * ramp(progress)


def beta_schedule(progress: float, ramp: Ramp = Ramp()) -> float:
    """CROWN-IBP's weight of the CROWN-IBP bound against IBP's: 1 → 0 over the ramp."""
    return 1.0 - ramp(progress)


def worst_case_ce(margin_lower: Tensor, y: Tensor) -> Tensor:
    """CE at the worst-case logits ``−m`` (B, K): an upper bound of the cross-entropy over the threat set."""
    return F.cross_entropy(-margin_lower.float(), y)


def bound_margins(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, crown_weight: float = 0.0) -> Tensor:
    """``β·m_CROWN-IBP + (1 − β)·m_IBP`` (B, K), β = ``crown_weight``; differentiable in the weights."""
    graph = build_graph(model, x)
    inp = InputSet.around(x, threat)
    boxes = interval_bounds(graph, inp)
    spec = margin_spec(y, graph[-1].shape[0], x.dtype)
    bound = ibp_margins(graph, boxes, spec)
    if crown_weight > 0:
        bound = crown_weight * crown_margins(graph, boxes, spec, inp) + (1.0 - crown_weight) * bound
    return bound


def check_bounds_apply(method: str, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> None:
    """Raise the certifier's ConfigError now if ``method`` (``ibp`` or ``crown-ibp``) cannot bound ``model``.

    Training calls it before anything is written, so an unsupported layer (or max-pooling under CROWN-IBP) is a
    one-line error at start-up, not at the first step with a half-made run directory. x (B, ...), y (B,): a few
    examples; the model's train/eval flags and BatchNorm statistics are left as they were."""
    from robustopt.threat.perturb import preserve_state

    with torch.no_grad(), preserve_state(model):
        model.eval()
        bound_margins(model, x, y, threat, crown_weight=1.0 if method == "crown-ibp" else 0.0)


def ibp_loss(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, kappa: float = 0.5, eps_scale: float = 1.0
) -> Tensor:
    """``κ·CE(f(x), y) + (1 − κ)·CE(−m_IBP(x; eps_scale·ε), y)``: Gowal et al. 2018. Call ``.backward()`` on it."""
    return crown_ibp_loss(model, x, y, threat, kappa=kappa, eps_scale=eps_scale, beta=0.0)


def crown_ibp_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    kappa: float = 0.0,
    eps_scale: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """``κ·CE(f(x), y) + (1 − κ)·CE(−(β·m_CROWN-IBP + (1 − β)·m_IBP), y)``: Zhang et al. 2020.

    Example (any loop)::

        p = step / total_steps
        loss = crown_ibp_loss(model, x, y, threat, kappa=kappa_schedule(p, "crown-ibp"), eps_scale=eps_schedule(p),
                              beta=beta_schedule(p))
    """
    return _mixed_loss(model, x, y, threat, kappa, eps_scale, beta, need_logits=False)[0]


def _mixed_loss(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, kappa: float, eps_scale: float, beta: float, need_logits: bool
) -> tuple[Tensor, Tensor | None]:
    """(κ-mixed loss, detached clean logits if computed)."""
    for name, value in (("kappa", kappa), ("eps_scale", eps_scale), ("beta", beta)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be between 0 and 1, got {value!r}")
    loss, logits = x.new_zeros((), dtype=torch.float32), None
    if kappa > 0 or need_logits:
        logits = model(x)
        loss = loss + kappa * F.cross_entropy(logits.float(), y)
    if kappa < 1:
        margins = bound_margins(model, x, y, threat.with_eps(threat.eps * eps_scale), crown_weight=beta)
        loss = loss + (1.0 - kappa) * worst_case_ce(margins, y)
    return loss, None if logits is None else logits.detach()


def gaussian_loss(model: nn.Module, x: Tensor, y: Tensor, *, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``CE(f(x + σ·N(0, I)), y)``: Gaussian data augmentation for randomized smoothing (Cohen et al. 2019)."""
    if not sigma > 0:
        raise ConfigError(f"gaussian: sigma must be > 0, got {sigma!r}")
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.cross_entropy(model(x + sigma * noise).float(), y)


def scheduled_loss(
    method: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    progress: float,
    *,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, detached clean logits) of ``method`` at training ``progress`` ∈ [0, 1], with the default schedules.

    The hook the training loop calls for ``ibp``, ``crown-ibp`` and ``gaussian``; ``sigma`` defaults to ε."""
    p = min(max(float(progress), 0.0), 1.0)
    if method == "gaussian":
        sigma = threat.eps if sigma is None else sigma
        noise = sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        logits = model(x + noise)
        return F.cross_entropy(logits.float(), y), logits.detach()
    if method not in CERTIFIED_METHODS:
        raise ConfigError(f"unknown certified training method {method!r}: choose one of {', '.join(CERTIFIED_METHODS)}")
    crown_weight = beta_schedule(p) if method == "crown-ibp" else 0.0
    loss, logits = _mixed_loss(model, x, y, threat, kappa_schedule(p, method), eps_schedule(p), crown_weight, need_logits=True)
    assert logits is not None
    return loss, logits
