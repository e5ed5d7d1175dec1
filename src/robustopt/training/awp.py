"""Adversarial weight perturbation (AWP; Wu, Xia and Wang, "Adversarial weight perturbation helps robust
generalization", NeurIPS 2020, arXiv 2004.05884), with any PGD-family, TRADES or MART objective.

One step, with L(w; x̃) the method's outer loss at fixed adversarial examples x̃ (found at w):

1. the inner maximisation: x̃ = argmax over the threat set, at w;
2. per layer l (every weight of dimension > 1: convolution and linear kernels; biases and BatchNorm
   parameters are not perturbed, as in the paper's code), ``v_l = γ·‖w_l‖·g_l/‖g_l‖`` with
   ``g_l = ∇_{w_l} L(w; x̃)``: one normalised ascent step of the weights, ‖v_l‖ = γ‖w_l‖;
3. the gradient of L(w + v; x̃), one optimiser step from w + v, then v is subtracted again, so the weights
   move by the update computed at w + v: ``w ← w + Δ(w + v)``.

The paper computes the direction with one SGD step of a proxy copy of the model; for one step from the same
weights, normalised per layer, that is the normalised gradient used here. The direction's forward pass
runs in the model's mode but gives its BatchNorm statistics back (the proxy's never reached the model). Under
DDP the direction gradients are summed over ranks, so every rank perturbs alike and the weights stay in sync.
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.threat.perturb import preserve_state
from robustopt.training.adversarial import adversarial_examples, outer_loss
from robustopt.training.objectives import StepContext, update

Tensor = torch.Tensor
TINY = 1e-20  # the paper's EPS: a zero gradient gives no perturbation instead of a NaN


def perturbed_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights AWP perturbs: trainable parameters of dimension > 1."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def weight_perturbation(weights: list[Tensor], grads: list[Tensor], gamma: float) -> list[Tensor]:
    """``v_l = γ·‖w_l‖·g_l/(‖g_l‖ + 1e-20)`` per layer (Frobenius norms)."""
    return [gamma * w.detach().norm() * g / (g.norm() + TINY) for w, g in zip(weights, grads, strict=True)]


def awp_step(ctx: StepContext, x: Tensor, y: Tensor, gamma: float) -> tuple[float, Tensor]:
    """One AWP optimiser step of ``ctx``'s objective (not ``free``, not the certified methods)."""
    obj, plain = ctx.objective, ctx.attack_model
    weights = perturbed_weights(plain)
    with ctx.autocast():
        x_adv = adversarial_examples(obj, plain, x, y, ctx.threat, ctx.generator)
    with preserve_state(plain):  # the backward pass first: BatchNorm saved its statistics for it
        with ctx.autocast():
            direction_loss, _ = outer_loss(obj, plain, x, x_adv, y)
        grads = list(torch.autograd.grad(direction_loss, weights, allow_unused=True))
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for g in grads:
            torch.distributed.all_reduce(g)
    v = weight_perturbation(weights, grads, gamma)
    with torch.no_grad():
        for w, dv in zip(weights, v, strict=True):
            w.add_(dv)
    try:
        with ctx.autocast():
            loss, logits = outer_loss(obj, ctx.model, x, x_adv, y)
        update(ctx, loss)
    finally:
        with torch.no_grad():
            for w, dv in zip(weights, v, strict=True):
                w.sub_(dv)
    return float(loss.detach()), logits
