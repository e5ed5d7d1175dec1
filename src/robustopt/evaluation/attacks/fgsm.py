"""The paper's single-step attacks: one first-order step of the threat's norm.

Shaham et al. (arXiv 1511.05432, Sec. 3) linearise the loss, ``max_{‖δ‖_p ≤ ε} ⟨∇ₓJ, δ⟩``:

* ℓ∞: ``δ = ε·sign(g)`` (FGSM, Goodfellow et al. 2015);
* ℓ2: ``δ = ε·g/‖g‖₂`` (fast gradient ℓ2, "FGM");
* ℓ1: ``δ = ε·sign(g_j)e_j`` with ``j = argmax |g_j|`` (one coordinate).

This is ``perturb(..., steps=1)``, the same code path training uses.

Example:
    >>> x_adv = fgsm(model, x, y, ThreatModel("l2", 1.5))   # (B, C, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.evaluation.attacks.losses import get_loss
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import LossFn, perturb


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, loss: str | LossFn = "ce") -> torch.Tensor:
    """One steepest-ascent step of size ε in the threat's norm; x (B, ...) -> x_adv (B, ...)."""
    return perturb(model, x, y, threat, steps=1, loss_fn=get_loss(loss))
