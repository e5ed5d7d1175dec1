"""The two halves of an adversarial objective: the inner maximisation and the outer loss at fixed x̃.

:func:`robustopt.training.objectives.objective_loss` is ``outer_loss(obj, model, x, adversarial_examples(...), y)``;
AWP (:mod:`robustopt.training.awp`) needs the halves apart, to evaluate the same outer loss at two weights.

With ``J_s`` the cross-entropy with label smoothing ``s`` (Szegedy et al. 2016; ``s = 0``: plain CE):

* PGD family (``goodfellow``, ``robust``, ``pgd``, ``fast``): ``α·J_s(x) + (1 − α)·J_s(x̃)``, x̃ ascending J;
* ``trades``: ``J_s(x) + β·KL(p(x) ‖ p(x̃))``, x̃ ascending the KL from ``x + 0.001·N(0, I)`` (Zhang et al. 2019);
* ``mart``: ``J_s(x̃) − log(1 − max_{k≠y} p_k(x̃)) + β·KL(p(x) ‖ p(x̃))·(1 − p_y(x))`` (Wang et al. 2020).

The inner maximisation always uses the unsmoothed loss: smoothing is a property of the training target only.
Shapes: x, x̃ (B, ...), y (B,), logits (B, K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import perturb, preserve_state

Tensor = torch.Tensor
TRADES_START = 0.001  # std of the Gaussian start of TRADES' and MART's inner maximisation


@dataclass(frozen=True)
class Objective:
    """A method and its options, resolved to concrete values (see :func:`~robustopt.training.objectives.make_objective`)."""

    method: str
    alpha: float  # weight of the clean loss (goodfellow / robust / pgd / fast)
    beta: float  # weight of the robustness term (trades / mart)
    steps: int  # inner-max steps
    step_size: float  # inner-max step α per iteration, pixel units
    random_start: bool
    sigma: float | None = None  # gaussian: noise std in pixels (default ε)
    label_smoothing: float = 0.0  # of the outer cross-entropy

    @property
    def clean_weight(self) -> float:
        return 1.0 if self.method == "standard" else self.alpha


def cross_entropy(obj: Objective, logits: Tensor, y: Tensor) -> Tensor:
    """The outer loss's cross-entropy, ``F.cross_entropy(logits, y, label_smoothing=s)`` in float32."""
    return F.cross_entropy(logits.float(), y, label_smoothing=obj.label_smoothing)


def kl_per_example(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) per example, from logits (B, K) -> (B,)."""
    log_p = F.log_softmax(p_logits.float(), dim=1)
    log_q = F.log_softmax(q_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def gaussian_start(x: Tensor, threat: ThreatModel, generator: torch.Generator | None) -> Tensor:
    """``x + 0.001·N(0, I)`` projected onto ball ∩ box: TRADES' and MART's start."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return threat.project(x + TRADES_START * noise, x)


def adversarial_examples(
    obj: Objective, attacker: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, generator: torch.Generator | None
) -> Tensor | None:
    """x̃ of the method's inner maximisation (None when its loss has no perturbed term), detached.

    It runs before any outer forward pass: its BatchNorm bookkeeping would otherwise modify tensors that
    the outer graph saved for backward. TRADES' target p(x) comes from a forward pass without gradients
    (BatchNorm statistics restored)."""
    if obj.method == "trades":
        with preserve_state(attacker), torch.no_grad():
            target = attacker(x).detach()
        return trades_examples(obj, attacker, x, target, threat, generator)
    if obj.method == "mart":
        x_init = gaussian_start(x, threat, generator)
        return perturb(attacker, x, y, threat, steps=obj.steps, step_size=obj.step_size, x_init=x_init, check=False).detach()
    if obj.clean_weight >= 1.0:
        return None
    return perturb(
        attacker, x, y, threat, steps=obj.steps, step_size=obj.step_size, random_start=obj.random_start,
        generator=generator, check=False,
    ).detach()  # fmt: skip


def trades_examples(
    obj: Objective, attacker: nn.Module, x: Tensor, target: Tensor, threat: ThreatModel, generator: torch.Generator | None
) -> Tensor:
    """TRADES' x̃: ascend KL(p(x) ‖ p(x̃)) from ``x + 0.001·N(0, I)``, ``target`` the clean logits (B, K), detached."""
    return perturb(
        attacker, x, target, threat, steps=obj.steps, step_size=obj.step_size,
        loss_fn=lambda logits, target: kl_per_example(target, logits), x_init=gaussian_start(x, threat, generator),
        check=False,
    ).detach()  # fmt: skip


def stateless(model: nn.Module) -> bool:
    """True when a forward pass in the model's current mode changes nothing and draws no random numbers that
    robustopt can see: no BatchNorm, and no dropout in train mode. Then a clean forward can be shared."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout)) and m.training and m.p > 0:
            return False
    return True


def trades_shared(
    obj: Objective, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """TRADES with one clean forward, not two: the outer loss's clean logits are also the attack's target.

    Only for a :func:`stateless` model that is its own attacker (no DDP or compiled wrapper): there the no-grad
    target forward of :func:`adversarial_examples` returns exactly these logits, so the result is the same."""
    clean = model(x)
    x_adv = trades_examples(obj, model, x, clean.detach(), threat, generator)
    return outer_loss(obj, model, x, x_adv, y, clean=clean)


def outer_loss(
    obj: Objective, model: nn.Module, x: Tensor, x_adv: Tensor | None, y: Tensor, clean: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(scalar loss, detached logits of the batch the accuracy is reported on: x̃ when there is one).

    ``clean``: the logits of x from a forward pass with gradients, when the caller already has them (TRADES)."""
    if obj.method in ("trades", "mart"):
        assert x_adv is not None
        clean, adv = model(x) if clean is None else clean, model(x_adv)
        if obj.method == "trades":
            return cross_entropy(obj, clean, y) + obj.beta * kl_per_example(clean, adv).mean(), adv.detach()
        adv_probs = F.softmax(adv.float(), dim=1)
        wrong = adv_probs.scatter(1, y[:, None], -1.0).argmax(dim=1)  # most likely wrong class, (B,)
        boosted = cross_entropy(obj, adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
        true_prob = F.softmax(clean.float(), dim=1).gather(1, y[:, None]).squeeze(1)
        return boosted + obj.beta * (kl_per_example(clean, adv) * (1.0000001 - true_prob)).mean(), adv.detach()
    alpha = obj.clean_weight
    loss, logits = x.new_zeros(()), None
    if alpha > 0.0:
        logits = model(x)
        loss = loss + alpha * cross_entropy(obj, logits, y)
    if x_adv is not None:
        logits = model(x_adv)  # accuracy is reported on the perturbed batch
        loss = loss + (1.0 - alpha) * cross_entropy(obj, logits, y)
    assert logits is not None
    return loss, logits.detach()
