"""The paper's single-step attacks: one first-order step of the threat's norm (FGSM, FGM, ℓ1)."""

from __future__ import annotations

import torch
from torch import nn

from robustopt.evaluation.attacks.losses import get_loss
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import LossFn, perturb

Tensor = torch.Tensor


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    loss: str | LossFn = "ce",
    generator: torch.Generator | None = None,
) -> Tensor:
    """One steepest-ascent step of size ε in the threat's norm: ``perturb(..., steps=1)``, the code path training uses.

    Paper: Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015 (ℓ∞);
    Shaham et al., arXiv 1511.05432, Sec. 3 (every norm). It linearises the loss,
    ``max_{‖δ‖_p ≤ ε} ⟨∇ₓJ, δ⟩``: ℓ∞ ``δ = ε·sign(g)``; ℓ2 ``δ = ε·g/‖g‖₂`` ("FGM");
    ℓ1 ``δ = ε·sign(g_j)e_j`` with ``j = argmax |g_j|``; then clips to the box.

    Distance: the threat's norm.

    Arguments:
        loss (str | callable): the loss whose gradient is followed. Default ``"ce"``.
        generator: accepted for the protocol; the attack is deterministic. There is no ``steps``:
            one step is the attack (use ``pgd`` or ``bim`` for more).

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = fgsm(model, x, y, ThreatModel("l2", 0.5))
        >>> bool(ThreatModel("l2", 0.5).contains(x_adv, x).all())
        True
    """
    return perturb(model, x, y, threat, steps=1, loss_fn=get_loss(loss))


ATTACKS = {"fgsm": fgsm, "fgm": fgsm}
