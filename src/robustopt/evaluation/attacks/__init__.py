"""Adversarial attacks, one small module each, all built on :class:`~robustopt.threat.model.ThreatModel`.

==============  ============================================================  ==================
name            attack                                                        norms
==============  ============================================================  ==================
``fgsm``        one first-order step of the threat's norm (FGSM / FGM / ℓ1)   linf, l2, l1
``fgm``         alias of ``fgsm`` (the name for ℓ2)                           linf, l2, l1
``pgd``         PGD with random restarts, loss ce/dlr/margin                  linf, l2, l1
``bim``         PGD without random start (Kurakin et al.)                     linf, l2, l1
``apgd-ce``     Auto-PGD, cross-entropy                                       linf, l2, l1
``apgd-dlr``    targeted Auto-PGD, DLR loss                                   linf, l2, l1
``fab-t``       targeted FAB (minimal perturbation); a success only within ε  linf, l2, l1
``square``      black-box Square attack                                       linf (l2, l1)
``auto``        APGD-CE + APGD-T + Square, worst case per example             linf, l2, l1
``autoattack``  AutoAttack "standard": APGD-CE, APGD-T, FAB-T, Square         linf, l2; l1: APGD
``deepfool``    DeepFool minimal perturbation in the threat's norm            linf, l2, l1
``cw``          Carlini–Wagner ℓ2 minimal perturbation                        l2
``lbfgs``       Szegedy et al.'s box-constrained L-BFGS                       l2
==============  ============================================================  ==================

:func:`run_attack` is the one entry point the evaluator uses. Like foolbox's base class it
projects every result onto the threat model itself, so no attack can return a point outside
it; the minimal-perturbation attacks (deepfool, cw, lbfgs) are thereby turned into
ε-bounded ones (a perturbation longer than ε is pulled back onto the ball).

Example:
    >>> from robustopt.evaluation.attacks import run_attack
    >>> x_adv = run_attack("pgd", model, x, y, ThreatModel("linf", 0.3), steps=40, restarts=2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustopt.errors import ConfigError
from robustopt.evaluation.attacks.apgd import apgd, apgd_targeted
from robustopt.evaluation.attacks.auto import auto
from robustopt.evaluation.attacks.autoattack import autoattack
from robustopt.evaluation.attacks.cw import cw_l2
from robustopt.evaluation.attacks.deepfool import deepfool
from robustopt.evaluation.attacks.fab import fab_targeted
from robustopt.evaluation.attacks.fgsm import fgsm
from robustopt.evaluation.attacks.lbfgs import lbfgs
from robustopt.evaluation.attacks.pgd import pgd
from robustopt.evaluation.attacks.square import square
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import check_inputs

Tensor = torch.Tensor
Attack = Callable[..., Tensor]  # (model, x, y, threat, steps, restarts, generator, **kw) -> x_adv


def _opt(steps: int | None, key: str) -> dict[str, int]:
    return {} if steps is None else {key: steps}


ATTACKS: dict[str, Attack] = {
    "fgsm": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: fgsm(m, x, y, t, **kw),
    "fgm": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: fgsm(m, x, y, t, **kw),
    "pgd": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: pgd(
        m, x, y, t, restarts=restarts, generator=generator, **_opt(steps, "steps"), **kw
    ),
    "bim": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: pgd(
        m, x, y, t, restarts=1, random_start=False, **_opt(steps, "steps"), **kw
    ),
    "apgd-ce": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: apgd(
        m, x, y, t, restarts=restarts, generator=generator, loss="ce", **_opt(steps, "steps"), **kw
    ),
    "apgd-dlr": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: apgd_targeted(
        m, x, y, t, generator=generator, **_opt(steps, "steps"), **kw
    ),
    "square": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: square(
        m, x, y, t, generator=generator, **_opt(steps, "queries"), **kw
    ),
    "auto": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: auto(
        m, x, y, t, restarts=restarts, generator=generator, **_opt(steps, "steps"), **kw
    ),
    "autoattack": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: autoattack(
        m, x, y, t, **_opt(steps, "steps"), **kw
    ),
    "fab-t": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: fab_targeted(
        m, x, y, t, **_opt(steps, "steps"), **kw
    ),
    "deepfool": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: deepfool(
        m, x, y, norm=t.norm, bounds=t.bounds, **_opt(steps, "steps"), **kw
    ),
    "cw": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: cw_l2(
        m, x, y, bounds=t.bounds, **_opt(steps, "steps"), **kw
    ),
    "lbfgs": lambda m, x, y, t, steps=None, restarts=1, generator=None, **kw: lbfgs(
        m, x, y, bounds=t.bounds, **_opt(steps, "max_iter"), **kw
    ),
}


def check_attack(name: str) -> str:
    """The attack name, or a ConfigError listing the valid ones."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    return name


def run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, **kw: Any) -> Tensor:
    """Run attack ``name`` and project its output onto the threat model; x (B, ...) -> x_adv (B, ...).

    Keyword arguments: ``steps`` (iterations; queries for square), ``restarts``, ``generator``,
    plus any keyword of the attack's own function (e.g. ``loss="dlr"`` for pgd).
    """
    check_inputs(x, y, threat, where=f"attack {name}")
    x_adv = ATTACKS[check_attack(name)](model, x.detach(), y, threat, **kw)
    return threat.project(x_adv.detach(), x.detach())


__all__ = [
    "ATTACKS",
    "apgd",
    "apgd_targeted",
    "auto",
    "autoattack",
    "check_attack",
    "cw_l2",
    "deepfool",
    "fab_targeted",
    "fgsm",
    "lbfgs",
    "pgd",
    "run_attack",
    "square",
]
