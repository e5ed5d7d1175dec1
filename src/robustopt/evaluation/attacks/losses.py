"""Per-example losses an attack can ascend, ``(logits (B, K), y (B,)) -> (B,)``.

* ``ce``: cross-entropy.
* ``margin``: ``max_{i≠y} z_i − z_y`` (Carlini & Wagner 2017), positive iff misclassified.
* ``dlr``: the Difference of Logits Ratio (Croce & Hein 2020),
  ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)`` with ``z_π`` sorted descending. Invariant to a
  shift and a rescaling of the logits, so a model cannot hide behind saturated softmax.
* ``targeted_dlr(t)``: ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)``.

Few classes. The denominators need the 3rd (and 4th) largest logit. With K = 3 the targeted
loss uses ``z_π1 − z_π3`` (the mean of the logits below the top two that exist). With K = 2
there is no scale-invariant loss with a gradient: up to a shift and a positive scale two
logits are ``(0, ±1)``, so any such loss is a function of the sign of the margin alone and
its gradient is zero. Both DLR losses then fall back to their numerator, the margin
``−(z_y − z_other)``, whose gradient is DLR's gradient direction at a fixed denominator
(APGD's ℓ∞ and ℓ2 steps use only that direction). The one thing lost is the invariance of the
loss *values* that APGD compares between iterates to a change of logit scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from robustopt.errors import ConfigError
from robustopt.threat.perturb import LossFn, cross_entropy

Tensor = torch.Tensor
_TINY = 1e-12


def best_other_logit(logits: Tensor, y: Tensor) -> Tensor:
    """max_{i≠y} z_i per example: (B, K), (B,) -> (B,)."""
    masked = logits.float().scatter(1, y[:, None], float("-inf"))
    return masked.max(dim=1).values


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y − max_{i≠y} z_i: > 0 iff correctly classified (ties count as wrong)."""
    return logits.float().gather(1, y[:, None]).squeeze(1) - best_other_logit(logits, y)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−margin: the Carlini–Wagner objective, > 0 iff misclassified."""
    return -margin(logits, y)


def _spread(z_sorted: Tensor, below: int) -> Tensor:
    """DLR's denominator ``z_π1 − mean(z_π3 .. z_π(2+below))`` over the logits that exist; 1 for K = 2."""
    k = z_sorted.shape[1]
    if k < 3:
        return torch.ones_like(z_sorted[:, 0])
    return z_sorted[:, 0] - z_sorted[:, 2 : 2 + below].mean(dim=1) + _TINY


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Untargeted DLR loss (Croce & Hein 2020, eq. 5); the margin for K = 2."""
    z = logits.float().sort(dim=1, descending=True).values
    return -margin(logits, y) / _spread(z, 1)


def targeted_dlr(target: Tensor) -> LossFn:
    """Targeted DLR loss towards ``target`` (B,) (Croce & Hein 2020, eq. 6); see the module note for K < 4."""

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        lf = logits.float()
        z = lf.sort(dim=1, descending=True).values
        gap = lf.gather(1, y[:, None]).squeeze(1) - lf.gather(1, target[:, None]).squeeze(1)
        return -gap / _spread(z, 2)

    return loss


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": cross_entropy, "dlr": dlr_loss, "margin": margin_loss}


def get_loss(name: str | LossFn) -> LossFn:
    """A loss by name (``ce``, ``dlr``, ``margin``), or a callable passed through."""
    if callable(name):
        return name
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown attack loss {name!r}: choose one of {', '.join(LOSSES)}") from None
