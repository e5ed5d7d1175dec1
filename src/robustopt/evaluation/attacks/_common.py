"""Shared pieces of the attacks: per-example radii, worst-case bookkeeping, predictions.

Projection onto a norm ball is positively homogeneous, ``P_{εB}(δ) = ε·P_B(δ/ε)``, so one
:class:`~robustopt.threat.model.ThreatModel` geometry serves a whole batch of *different* radii
``ε_i`` (B,): the binary searches of :mod:`robustopt.evaluation.stability` need exactly that.
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def radii(threat: ThreatModel, x: Tensor, eps: Tensor | None = None) -> Tensor:
    """Per-example radii (B,): ``eps`` if given, else the threat's ε for every example."""
    if eps is None:
        return torch.full((x.shape[0],), threat.eps, device=x.device, dtype=x.dtype)
    return eps.to(device=x.device, dtype=x.dtype).reshape(-1)


def project(threat: ThreatModel, x_adv: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """Project onto ``{‖δ_i‖ ≤ eps_i} ∩ box`` for per-example radii eps (B,)."""
    e = _bcast(eps.clamp_min(1e-12), x)
    delta = threat.geometry.project_ball((x_adv - x) / e, 1.0) * e
    delta = torch.where(_bcast(eps > 0, x), delta, torch.zeros_like(delta))
    return threat.clip(x + delta)


def random_init(threat: ThreatModel, x: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
    """A uniform point of each example's ball (radius eps_i), clipped to the box."""
    return threat.clip(x + threat.geometry.random_ball(x, 1.0, generator) * _bcast(eps, x))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted labels (B,), in chunks."""
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


class WorstCase:
    """Keeps, per example, the best point found so far.

    A misclassified point beats any correctly classified one; among points of the same kind
    the higher loss wins. ``x_best`` starts at ``x_start``.
    """

    def __init__(self, x_start: Tensor) -> None:
        b = x_start.shape[0]
        self.x = x_start.detach().clone()
        self.fooled = torch.zeros(b, dtype=torch.bool, device=x_start.device)
        self.loss = torch.full((b,), float("-inf"), device=x_start.device)

    def update(self, x_new: Tensor, loss: Tensor, fooled: Tensor) -> None:
        """x_new (B, ...), loss (B,), fooled (B,) bool."""
        loss = loss.detach().float()
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (loss > self.loss))
        self.x[better] = x_new.detach()[better]
        self.loss = torch.where(better, loss, self.loss)
        self.fooled |= fooled
