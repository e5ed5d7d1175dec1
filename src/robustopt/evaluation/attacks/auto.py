"""``auto``: an AutoAttack-style ensemble, worst case per example over APGD-CE, APGD-T and Square."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from robustopt.evaluation.attacks._common import Attack, cascade
from robustopt.evaluation.attacks.apgd import apgd, apgd_targeted
from robustopt.evaluation.attacks.square import square
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import attack_state

Tensor = torch.Tensor


def components(steps: int, n_targets: int, queries: int, restarts: int, generator) -> list[tuple[str, Attack]]:
    """The ensemble's attacks, in order, each ``(model, x, y, threat) -> x_adv``."""
    return [
        ("apgd-ce", partial(apgd, steps=steps, restarts=restarts, loss="ce", generator=generator)),
        ("apgd-t", partial(apgd_targeted, steps=steps, n_targets=n_targets, generator=generator)),
        ("square", partial(square, steps=queries, generator=generator)),
    ]


def auto(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    n_targets: int = 9,
    queries: int = 5000,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """APGD-CE, then APGD-T, then Square, each only on the examples every earlier one failed on.

    Paper: Croce & Hein, ICML 2020 (the AutoAttack idea); Square: Andriushchenko et al., ECCV 2020.
    Two white-box losses with a self-tuning step size and a gradient-free search make a
    robustness figure hard to fake: a model that masks gradients survives the first two, not Square.

    Distance: the threat's norm (ℓ∞, ℓ2, ℓ1).

    Arguments:
        steps (int): APGD iterations (per restart, per target). Default 100.
        n_targets (int): APGD-T target classes, ``min(n_targets, K − 1)``. Default 9.
        queries (int): Square's steps (one model query each). Default 5000.
        restarts (int): APGD-CE restarts. Default 1.
        generator (torch.Generator): seeds every component.
        stats (dict): if given, accumulates the robust count after the clean pass and after each
            component, e.g. ``{'clean': 97, 'apgd-ce': 61, 'apgd-t': 58, 'square': 58}``.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = auto(model, x, y, ThreatModel("linf", 0.1), steps=3, n_targets=2, queries=10)
        >>> x_adv.shape == x.shape
        True
    """
    with attack_state(model, "auto"):
        return cascade(model, x, y, threat, components(steps, n_targets, queries, restarts, generator), stats)


ATTACKS = {"auto": auto}
