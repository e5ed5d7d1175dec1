"""An AutoAttack-style ensemble (Croce & Hein, ICML 2020): worst case per example over

1. APGD with cross-entropy,
2. targeted APGD with the DLR loss against the most likely wrong classes,
3. the black-box Square attack,

each run only on the examples every earlier attack failed on. Two white-box losses with a
self-tuning step size and a gradient-free search make a robustness figure hard to fake: a
model that masks gradients survives 1 and 2 but not 3.

Example:
    >>> stats = {}
    >>> x_adv = auto(model, x, y, ThreatModel("linf", 0.3), stats=stats)
    >>> stats   # {'clean': 97, 'apgd-ce': 61, 'apgd-t': 58, 'square': 58}  robust counts after each
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.attacks.apgd import apgd, apgd_targeted
from robustopt.evaluation.attacks.square import square
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor


def components(steps: int, n_targets: int, queries: int, restarts: int, generator) -> list[tuple[str, Callable[..., Tensor]]]:
    """The ensemble's attacks, in order, each ``(model, x, y, threat) -> x_adv``."""
    return [
        ("apgd-ce", lambda m, x, y, t: apgd(m, x, y, t, steps=steps, restarts=restarts, loss="ce", generator=generator)),
        ("apgd-t", lambda m, x, y, t: apgd_targeted(m, x, y, t, steps=steps, n_targets=n_targets, generator=generator)),
        ("square", lambda m, x, y, t: square(m, x, y, t, queries=queries, generator=generator)),
    ]


def cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attacks: list[tuple[str, Callable[..., Tensor]]],
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Run ``attacks`` in order, each only on the examples every earlier one failed on.

    x (B, ...), y (B,) -> x_adv (B, ...): the first adversarial point found per example (x where
    none). A point counts as broken only if it is misclassified *inside* the threat model, so
    the robust count can only fall from one attack to the next. ``stats`` accumulates the robust
    count after the clean pass and after each attack.
    """
    x = x.detach()
    x_adv = x.clone()
    robust = predict(model, x) == y
    if stats is not None:
        stats["clean"] = stats.get("clean", 0) + int(robust.sum())
    for name, attack in attacks:
        todo = robust.nonzero().squeeze(1)
        if todo.numel():
            cand = threat.project(attack(model, x[todo], y[todo], threat), x[todo])
            hit = predict(model, cand) != y[todo]
            x_adv[todo[hit]] = cand[hit]
            robust[todo[hit]] = False
        if stats is not None:
            stats[name] = stats.get(name, 0) + int(robust.sum())
    return x_adv


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
    """The ensemble; x (B, C, H, W), y (B,) -> worst-case x_adv. ``stats`` gets robust counts."""
    return cascade(model, x, y, threat, components(steps, n_targets, queries, restarts, generator), stats)
