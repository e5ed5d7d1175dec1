"""Automatic checks that an evaluation can be trusted (signs of gradient masking).

A model that *masks* its gradients (zero, noisy or useless input gradients) defeats
gradient attacks without being robust (Athalye et al. 2018; Tramèr et al. 2018). Each
check below compares attacks that must be ordered if gradients are informative; a
violation is recorded as ``{"passed": False, ...}`` and printed loudly. All accuracies are
robust accuracies on the same examples: correct on x *and* on x_adv.

* ``large_eps``: PGD with ε = the diameter of the box (every input reachable) must leave
  accuracy ~0 (≤ ``large_eps_max``);
* ``more_steps``: PGD with 2× the steps and 2 restarts must not be more than ``tol`` above PGD;
* ``iterative_vs_single``: PGD must not be more than ``tol`` above the single-step attack;
* ``whitebox_vs_blackbox``: the white-box accuracy (PGD, and the evaluated attack when it
  is white-box) must not be more than ``tol`` above the black-box Square attack's;
* ``whitebox_vs_transfer``: likewise against the transfer accuracy (only with a source model);
* ``zero_gradients``: at most ``tol`` of the examples may have an exactly zero input gradient
  (AutoAttack's ``checks.py`` idea).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustopt.evaluation.attacks import fgsm, pgd, square
from robustopt.evaluation.attacks._common import predict
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import frozen_parameters, input_gradient, preserve_state

Tensor = torch.Tensor
Log = Callable[[str], None]


def robust_accuracy(model: nn.Module, x_adv: Tensor, y: Tensor, clean: Tensor) -> tuple[float, Tensor]:
    """(accuracy, mask (B,)): correct on x and on x_adv."""
    mask = clean & (predict(model, x_adv) == y)
    return float(mask.float().mean()), mask


def diameter(threat: ThreatModel, x: Tensor) -> float:
    """The largest distance in the box in the threat's norm, (hi − lo)·D^(1/p)."""
    lo, hi = threat.bounds
    return float(threat.norm_of(torch.full_like(x[:1], hi - lo)))


def _check(passed: bool, message: str, **details: Any) -> dict[str, Any]:
    return {"passed": bool(passed), "message": message, **details}


def _zero_gradients(model: nn.Module, x: Tensor, y: Tensor, tol: float) -> dict[str, Any]:
    with preserve_state(model), frozen_parameters(model):
        grad, _ = input_gradient(model, x, y)
    frac = float((grad.flatten(1).abs().amax(1) == 0).float().mean())
    return _check(frac <= tol, "share of examples with an exactly zero input gradient", zero_fraction=frac)


def run_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    evaluated: Tensor | None = None,
    transfer: Tensor | None = None,
    steps: int = 20,
    queries: int = 1000,
    tol: float = 0.02,
    large_eps_max: float = 0.02,
    generator: torch.Generator | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every check on (x (B, ...), y (B,)).

    ``evaluated`` is the white-box robust mask (B,) of the evaluated attack (None for a
    transfer evaluation); ``transfer`` the transfer robust mask (B,) when there is one.
    Returns ``{check_name: {"passed": bool, "message": str, ...accuracies}}``.
    """
    clean = predict(model, x) == y
    single, _ = robust_accuracy(model, fgsm(model, x, y, threat), y, clean)
    p1, m1 = robust_accuracy(model, pgd(model, x, y, threat, steps=steps, generator=generator), y, clean)
    p2, m2 = robust_accuracy(model, pgd(model, x, y, threat, steps=2 * steps, restarts=2, generator=generator), y, clean)
    big = threat.with_eps(diameter(threat, x))
    large, _ = robust_accuracy(model, pgd(model, x, y, big, steps=steps, generator=generator), y, clean)
    black, _ = robust_accuracy(model, square(model, x, y, threat, queries=queries, generator=generator), y, clean)
    white_mask = m1 & m2 if evaluated is None else m1 & m2 & evaluated
    white = float(white_mask.float().mean())
    checks = {
        "large_eps": _check(large <= large_eps_max, "PGD accuracy with every input reachable", eps=big.eps, accuracy=large),
        "more_steps": _check(p2 <= p1 + tol, f"PGD-{2 * steps}x2 vs PGD-{steps}", more=p2, fewer=p1),
        "iterative_vs_single": _check(p2 <= single + tol, "PGD vs single-step accuracy", iterative=p2, single_step=single),
        "whitebox_vs_blackbox": _check(white <= black + tol, "white-box vs Square accuracy", whitebox=white, blackbox=black),
        "zero_gradients": _zero_gradients(model, x, y, tol),
    }
    if transfer is not None:
        t_acc = float(transfer.float().mean())
        checks["whitebox_vs_transfer"] = _check(
            white <= t_acc + tol, "white-box vs transfer accuracy", whitebox=white, transfer=t_acc
        )
    for c in checks.values():
        c["tolerance"] = tol
    return checks


def _fmt(key: str, value: Any) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"{key}={value}"


def report_failures(checks: dict[str, dict[str, Any]], log: Log) -> None:
    """Print each failed check loudly, as a possible sign of gradient masking."""
    for name, c in checks.items():
        if not c["passed"]:
            nums = ", ".join(_fmt(k, v) for k, v in c.items() if k not in ("passed", "message"))
            log(f"!!! SANITY CHECK FAILED: {name} ({c['message']}: {nums})")
            log("!!! possible gradient masking: do not trust this robustness figure until a stronger attack agrees")
