"""Both bounds on robust accuracy at once: verified (a guaranteed lower bound) beside attacked (an upper bound).

:func:`bounds` certifies a model (:func:`robustopt.certify.certify`, IBP / CROWN-IBP / CROWN) and attacks it
(:func:`robustopt.evaluation.evaluate.evaluate`) on the same examples, and checks them against each other per example:
an example proved robust must survive the attack. One that does not is a soundness bug in the certifier (or the
attack left the threat set), so it is raised as :class:`SoundnessError`, never averaged away.
:func:`certified_curve` repeats this over a list of ε (the data of :func:`robustopt.certify.plots.certified_curve_plot`).

Example:
    >>> b = bounds(model, x, y, ThreatModel("linf", 0.1), "pgd", certify="ibp")
    >>> b.verified_accuracy <= b.attacked_accuracy, b.gap
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robustopt.certify.core import CertifyResult, check_supported
from robustopt.certify.core import certify as certify_bounds
from robustopt.errors import RobustoptError
from robustopt.evaluation.evaluate import EvalResult, evaluate
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor


class SoundnessError(RobustoptError):
    """An example the certifier proved robust was broken by the attack: a bug in the certifier (or the attack)."""

    exit_code = 1


@dataclass(frozen=True)
class BoundsResult:
    """Verified accuracy ≤ robust accuracy ≤ attacked accuracy, and the gap between the two bounds.

    Attributes:
        evaluation: the attack's :class:`~robustopt.evaluation.evaluate.EvalResult` (upper bound).
        certified: the certifier's :class:`~robustopt.certify.CertifyResult` (lower bound).
        verified_accuracy, attacked_accuracy: the two bounds; ``gap`` = attacked − verified (≥ 0).
        inconsistent: indices of examples verified robust but broken by the attack (empty unless a bug).
    """

    evaluation: EvalResult
    certified: CertifyResult
    verified_accuracy: float
    attacked_accuracy: float
    gap: float
    inconsistent: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The evaluation's JSON form with ``verified_accuracy``, ``certify_method``, ``certify_seconds``, ``gap``."""
        out = self.evaluation.to_dict()
        out.update(verified_accuracy=self.verified_accuracy, certify_method=self.certified.method,
                   certify_seconds=self.certified.seconds, gap=self.gap, inconsistent=list(self.inconsistent))  # fmt: skip
        return out


def bounds(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attack: Any = "pgd",
    *,
    certify: str = "ibp",
    certify_batch_size: int = 500,
    strict: bool = True,
    flag: str = "certify",
    **evaluate_options: Any,
) -> BoundsResult:
    """Certify and attack ``model`` on (x, y) within ``threat``; returns both bounds, the gap and the per-example check.

    Args:
        attack: what :func:`~robustopt.evaluation.evaluate.evaluate` runs (a name or a protocol function).
        certify: ``ibp``, ``crown-ibp`` or ``crown``. The model is checked first: an unsupported layer (or MaxPool2d
            under a CROWN method) is a one-line ConfigError before the attack runs.
        certify_batch_size: examples per bound computation.
        strict: raise :class:`SoundnessError` when a verified example is broken by the attack (default); when
            False, print it loudly on stderr and list the examples in ``inconsistent``.
        flag: how messages name the method option (``--certify`` for the CLI).
        **evaluate_options: keyword arguments of ``evaluate`` (``steps``, ``restarts``, ``batch_size``, ``sanity``, ...).
    """
    check_supported(model, x, certify, flag=flag)
    cert = certify_bounds(model, x, y, threat, certify, batch_size=certify_batch_size)
    ev = evaluate(model, x, y, threat, attack, **evaluate_options)
    verified, robust = cert.verified.cpu(), ev.robust_mask.cpu()
    bad = tuple(int(i) for i in torch.nonzero(verified & ~robust).flatten())
    if bad:
        msg = (f"soundness violation: {len(bad)} example(s) verified robust by {certify} were broken by {ev.attack} "
               f"({threat.norm} eps={threat.eps:g}; first indices {list(bad[:10])}); this is a bug in the certifier or "
               "the attack, please report it")  # fmt: skip
        if strict:
            raise SoundnessError(msg)
        print("ERROR: " + msg, file=sys.stderr)
    n = len(verified)  # both accuracies as counts / n, as evaluate counts: the gap is exact and never negative
    verified_acc, gap = int(verified.sum()) / n, (int(robust.sum()) - int(verified.sum())) / n
    return BoundsResult(ev, cert, verified_acc, ev.adversarial_accuracy, gap, bad)


def certified_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str,
    eps: Sequence[float],
    attack: Any = "pgd",
    *,
    certify: str = "ibp",
    certify_batch_size: int = 500,
    **evaluate_options: Any,
) -> dict[str, Any]:
    """Verified and attacked accuracy at every ε of ``eps`` (pixel units), with the same per-example check as :func:`bounds`.

    ``attack=None`` certifies only. Returns ``{"norm", "method", "attack", "eps": [...], "verified": [...],
    "attacked": [... or None], "clean", "n", "certify_seconds": [...]}``."""
    check_supported(model, x, certify)
    out: dict[str, Any] = {"norm": norm, "method": certify, "attack": attack if isinstance(attack, str) or attack is None
                           else getattr(attack, "__name__", "attack"), "eps": [], "verified": [], "attacked": [],
                           "certify_seconds": [], "n": len(y)}  # fmt: skip
    evaluate_options = {"sanity": False, "progress": False, **evaluate_options}
    for e in eps:
        threat = ThreatModel(norm, float(e))
        if attack is None:
            cert, attacked = certify_bounds(model, x, y, threat, certify, batch_size=certify_batch_size), None
        else:
            b = bounds(model, x, y, threat, attack, certify=certify, certify_batch_size=certify_batch_size, **evaluate_options)
            cert, attacked = b.certified, b.attacked_accuracy
        out["eps"].append(float(e))
        out["verified"].append(int(cert.verified.sum()) / len(y))  # counted as bounds() and evaluate() count
        out["attacked"].append(attacked)
        out["certify_seconds"].append(cert.seconds)
        out["clean"] = int(cert.clean_correct.sum()) / len(y)
    return out
