"""Adversarial attacks, one small module each, all following one protocol over :class:`~robustopt.threat.model.ThreatModel`.

The protocol
------------
Every attack is a function ::

    attack(model, x, y, threat, *, steps=..., generator=None, <its own keyword-only options>) -> x_adv

* ``model`` maps inputs (B, ...) in ``threat.bounds`` to logits (B, K), K >= 2; ``x`` (B, ...)
  are the clean inputs (feature vectors (B, D), images (B, C, H, W), anything with a batch
  dim); ``y`` (B,) integer labels in 0 .. K-1; ``threat`` gives the norm, ε and the box.
* ``steps`` is the attack's iteration budget (what one step is: see each attack; fgsm has none);
  ``restarts`` exists where restarts mean something (pgd, apgd-ce, auto); ``generator`` seeds
  every random choice (attacks without randomness accept and ignore it).
* It returns x_adv (B, ...) inside ball ∩ box, works inside ``torch.no_grad()``, refuses
  ``torch.inference_mode()``, never accumulates weight gradients and restores the model's
  train/eval flags and BatchNorm statistics.

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
``cw``          Carlini–Wagner ℓ2 minimal perturbation                        l2 (projected)
``lbfgs``       Szegedy et al.'s box-constrained L-BFGS                       l2 (projected)
==============  ============================================================  ==================

The entry point
---------------
:func:`run_attack` ``(model, x, y, threat, attack="pgd", **options)`` checks the inputs (a
:class:`~robustopt.errors.RobustoptError` with one line for bad ones), checks the options
against the attack's signature (:func:`attack_options`; an unknown one is a ConfigError that
lists the valid ones), runs the attack and, like foolbox's ``@final __call__``, projects the
result onto the threat itself, so no attack can return a point outside it. The
minimal-perturbation attacks (deepfool, cw, lbfgs) thereby become ε-bounded ones.

:func:`attack_options` ``(name) -> {option: inspect.Parameter}`` gives each keyword-only option
with its default and type hint, so a CLI can derive its per-attack flags from the signature.

Adding an attack: one new file, no other edit
---------------------------------------------
Drop ``myattack.py`` into this package with a module-level ``ATTACKS`` dict; the registry
(:mod:`._registry`) imports every public module of the package and collects them::

    # robustopt/evaluation/attacks/noise.py
    def noise(model, x, y, threat, *, steps: int = 1, generator=None):
        "Random point of the ball (a baseline)."
        return threat.random_init(x, generator)

    ATTACKS = {"noise": noise}

``run_attack(model, x, y, threat, "noise")`` and ``attack_options("noise")`` then work, and a
CLI that builds its flags from :func:`attack_options` offers ``--attack noise --steps N``.

Example:
    >>> x_adv = run_attack(model, x, y, ThreatModel("linf", 0.1), "pgd", steps=5, restarts=2)
    >>> bool(ThreatModel("linf", 0.1).contains(x_adv, x).all())
    True
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from robustopt.errors import ConfigError, DataError
from robustopt.evaluation.attacks._common import Attack
from robustopt.evaluation.attacks._registry import check_options, discover, name_of, options_of
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
from robustopt.threat.perturb import attack_state, check_grad_mode, check_inputs, check_labels, check_module

Tensor = torch.Tensor
ATTACKS: dict[str, Attack] = discover()


def check_attack(name: str) -> str:
    """The attack name, or a ConfigError listing the valid ones."""
    if not isinstance(name, str) or name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    return name


def attack_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword-only options of a registered attack: ``{option: inspect.Parameter}`` (default, annotation).

    Example: ``attack_options("pgd")["steps"].default == 40``; ``"restarts" in attack_options("pgd")``;
    ``"steps" not in attack_options("fgsm")``. ``parameter.annotation`` is the hint as written (a
    string such as ``"int"`` or ``"str | LossFn"``). Options annotated ``int``, ``float``, ``bool`` or
    ``str`` (possibly ``| None``) make command-line flags; those taking a ``Tensor``, a
    ``torch.Generator``, a callable or a ``dict`` (``radius``, ``target``, ``generator``, ``stats``)
    are for Python callers. ``generator`` is in every attack's options.
    """
    return options_of(ATTACKS[check_attack(name)])


def _check_output(x_adv: object, x: Tensor, name: str) -> Tensor:
    if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
        raise DataError(f"attack {name} returned {got} for inputs of shape {tuple(x.shape)}; an attack returns x_adv like x")
    return x_adv.detach().to(x.dtype)


def run_attack(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, attack: str | Attack = "pgd", **options: Any
) -> Tensor:
    """Run ``attack`` (a registered name, or a function following the protocol) and project its output onto ``threat``.

    x (B, ...), y (B,) -> x_adv (B, ...) inside ball ∩ box. ``options`` are the attack's own
    keyword-only options (:func:`attack_options`), e.g. ``steps=40, restarts=2, loss="dlr"``
    for pgd. Refuses bad inputs with a one-line :class:`~robustopt.errors.RobustoptError`:
    an unknown attack or option, ``threat`` not a ThreatModel, non-float, NaN or out-of-box x,
    labels of the wrong shape, negative or not below the model's class count, and
    ``torch.inference_mode()``. Works inside ``torch.no_grad()``.
    """
    fn = ATTACKS[check_attack(attack)] if isinstance(attack, str) else attack
    name = attack if isinstance(attack, str) else name_of(attack)
    where = f"attack {name}"
    if not callable(fn):
        raise ConfigError(f"attack must be a registered name or a function, got {type(attack).__name__}")
    check_options(name, fn, options)
    check_module(model, where)
    check_grad_mode(where)
    check_inputs(x, y, threat, where)
    x = x.detach().clone() if x.is_inference() else x.detach()  # made under inference_mode: a normal tensor now
    y = y.clone() if y.is_inference() else y
    with attack_state(model, where):
        with torch.no_grad():
            check_labels(model(x), y, where)
        x_adv = _check_output(fn(model, x, y, threat, **options), x, name)
    return threat.project(x_adv, x)


__all__ = [
    "ATTACKS",
    "apgd",
    "apgd_targeted",
    "attack_options",
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
