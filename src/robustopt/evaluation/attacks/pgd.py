"""Projected gradient descent (PGD, BIM) with random restarts, for every norm: ``perturb`` with a best-iterate tracker.

Each iteration is ``x ← Π_{B(x₀,ε) ∩ box}(x + α·d(∇ₓL))`` with ``d`` the threat's (iterative)
steepest-ascent direction: ``sign`` for ℓ∞, ``g/‖g‖₂`` for ℓ2, a sparse top-k step for ℓ1.
There is one loop, :func:`robustopt.threat.perturb.perturb`, shared with training; the attack
hands it a :class:`~robustopt.threat.perturb.WorstCase` tracker and returns, per example, the
worst case over *every iterate of every restart*, so more steps or restarts can only help it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from robustopt.errors import ConfigError
from robustopt.evaluation.attacks.losses import get_loss
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import LossFn, WorstCase, attack_state, check_step_size, perturb

Tensor = torch.Tensor


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
    radius: Tensor | None = None,
) -> Tensor:
    """PGD with restarts, the worst case per example over every iterate.

    Paper: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018;
    BIM (``random_start=False``): Kurakin et al., "Adversarial examples in the physical world", 2017.

    Distance: the threat's norm (ℓ∞, ℓ2, ℓ1).

    Arguments:
        steps (int): gradient steps per restart; one step is one forward and backward pass. Default 40.
        restarts (int): independent runs; the first starts at a random point of the ball when
            ``random_start``, every later one always does. Default 1.
        step_size (float): α; default 2.5·ε/steps (Madry et al.).
        loss (str | callable): ``"ce"``, ``"dlr"``, ``"margin"`` or ``(logits, y) -> (B,)``. Default ``"ce"``.
        random_start (bool): start the first restart from a uniform point of the ball. Default True.
        generator (torch.Generator): seeds the random starts.
        radius (Tensor): optional per-example radii (B,) instead of ε (the stability binary search);
            α then scales with each radius.

    Shape:
        x: (B, ...) in ``threat.bounds``; y: (B,) labels; returns (B, ...) inside the threat.

    Example:
        >>> x_adv = pgd(model, x, y, ThreatModel("linf", 0.1), steps=5, restarts=2)
        >>> bool(ThreatModel("linf", 0.1).contains(x_adv, x).all())
        True
    """
    if steps < 1 or restarts < 1:
        raise ConfigError(f"pgd: steps and restarts must be >= 1, got {steps}, {restarts}")
    check_step_size(step_size, "pgd")
    loss_fn = get_loss(loss)
    x = x.detach()
    radius = threat.radii(x, radius)
    alpha = radius * (2.5 / steps) if step_size is None else radius * (step_size / max(threat.eps, 1e-12))
    best = WorstCase(x)
    with attack_state(model, "pgd"):
        for r in range(restarts):
            perturb(model, x, y, threat, steps=steps, step_size=alpha, random_start=random_start or r > 0, loss_fn=loss_fn,
                    generator=generator, check=False, radius=radius, tracker=best)  # fmt: skip
    return best.x


ATTACKS = {"pgd": pgd, "bim": partial(pgd, random_start=False)}
