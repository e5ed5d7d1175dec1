"""Shared pieces of the attacks: predictions, the one cascade (also the per-target loop), the one c-search.

* :func:`cascade` runs attacks one after the other, each only on the examples every earlier one
  failed to break inside the threat. ``auto`` and ``autoattack`` are cascades of attacks;
  APGD-T and FAB-T are cascades over target classes (:func:`over_targets`).
* :func:`target_classes`: the ``min(n, K − 1)`` highest non-true logits, most likely first.
* :class:`ConstantSearch`: the per-example bracketing search over the trade-off constant c
  of Carlini–Wagner and L-BFGS.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor
Attack = Callable[..., Tensor]  # (model, x, y, threat, *, steps, generator, ...) -> x_adv


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted labels (B,), in chunks."""
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def target_classes(model: nn.Module, x: Tensor, y: Tensor, n: int) -> Tensor:
    """The ``min(n, K − 1)`` classes other than y with the highest logits at x, most likely first: (B, n')."""
    logits = model(x).float().scatter(1, y[:, None], float("-inf"))  # (B, K), the true class last
    return logits.sort(dim=1, descending=True).indices[:, : min(n, logits.shape[1] - 1)]


def cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attacks: list[tuple[str, Attack]],
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Run ``attacks`` (each ``(model, x, y, threat) -> x_adv``) in order, each only on the examples every earlier one failed on.

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


def over_targets(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, n_targets: int, attack: Attack, **options: object
) -> Tensor:
    """The per-target loop of APGD-T and FAB-T (and so of ``auto`` and ``autoattack``): a cascade over target ranks.

    Target ``rank`` of an example is its (rank+1)-th most likely wrong class at the clean point
    (:func:`target_classes`), for ``rank < min(n_targets, K − 1)``. ``attack(model, x, y,
    threat, rank=r, **options)`` attacks towards that target; each rank runs only on the
    examples no earlier rank broke. With two classes there is one target, the other class.
    """
    with torch.no_grad():
        k = model(x).shape[1]
    ranks = range(min(n_targets, k - 1))
    return cascade(model, x, y, threat, [(f"target {r + 1}", partial(attack, rank=r, **options)) for r in ranks])


class ConstantSearch:
    """A per-example bracketing search over a positive constant c (B,), shared by Carlini–Wagner and L-BFGS.

    Both minimise a distance plus c times an attack loss (CW) or c times a distance plus a loss
    (L-BFGS). ``success_at_larger`` says which way success lies: True when a larger c makes
    success more likely (CW: c weighs the attack loss), False when a smaller one does (L-BFGS:
    c weighs the distance). After each attempt ``update(ok)`` narrows the bracket ``[lo, hi]``
    and picks the next c:

    * no success yet: move towards success by a factor 10;
    * no failure yet: move away from success by a factor 10 (``geometric=True``) or 2
      (``geometric=False``: the arithmetic midpoint with the open end at 0, as CW does);
    * bracketed: the midpoint, arithmetic ``(lo + hi)/2`` or geometric ``√(lo·hi)``.
    """

    def __init__(self, c_init: float, like: Tensor, *, success_at_larger: bool, geometric: bool) -> None:
        self.c = torch.full((like.shape[0],), c_init, device=like.device)
        self.lo, self.hi = torch.zeros_like(self.c), torch.full_like(self.c, float("inf"))
        self.success_at_larger, self.geometric = success_at_larger, geometric

    def update(self, ok: Tensor) -> None:
        """Record the attempt at the current c (``ok`` (B,) bool: success) and move c."""
        c, larger = self.c, self.success_at_larger
        smaller_next = ok if larger else ~ok  # the examples whose next c is smaller: c bounds the bracket from above
        self.hi = torch.where(smaller_next, torch.minimum(self.hi, c), self.hi)
        self.lo = torch.where(smaller_next, self.lo, torch.maximum(self.lo, c))
        lo, hi = self.lo, self.hi
        open_hi, open_lo = torch.isinf(hi), lo == 0
        no_success, no_failure = (open_hi, open_lo) if larger else (open_lo, open_hi)
        toward, away = (c * 10, c / 10) if larger else (c / 10, c * 10)
        if not self.geometric:
            away = hi / 2 if larger else lo * 2  # (lo + hi)/2 with the open end at 0
        mid = (lo * hi).sqrt() if self.geometric else (lo + hi) / 2
        self.c = torch.where(no_success, toward, torch.where(no_failure, away, mid))
