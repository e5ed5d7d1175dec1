"""Square attack (Andriushchenko et al., ECCV 2020): black-box random search, no gradients.

Only the model's logits are queried, so masked or obfuscated gradients do not stop it; that
is why the evaluator uses it as the gradient-masking check.

Algorithm, per example still classified correctly:

1. start from vertical stripes: each (channel, column) gets ``±v`` with ``v`` chosen so the
   whole image pattern has norm ε (``v = ε`` for ℓ∞);
2. at query ``i`` pick a random ``s × s`` window, ``s = round(√(p_i·H·W))``, and give each
   channel of it a fresh constant ``±v_w`` with ``v_w = ε / ‖1_window‖_p`` (the window alone
   has norm ε); project onto the ball ∩ box;
3. keep the proposal iff it lowers the margin ``z_y − max_{i≠y} z_i``;
4. ``p`` starts at ``p_init`` and halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000,
   8000 (of 10 000, rescaled to the query budget) queries.

For ℓ∞ this is the published attack. For ℓ2 and ℓ1 the same window proposal followed by
projection is a simpler random search than the paper's mass-moving ℓ2 update: weaker, but
still gradient-free and always inside the threat model.

Example:
    >>> x_adv = square(model, x, y, ThreatModel("linf", 0.3), queries=5000)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustopt.evaluation.attacks._common import project, radii
from robustopt.evaluation.attacks.losses import margin
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import preserve_state

Tensor = torch.Tensor
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def window_fraction(i: int, queries: int, p_init: float) -> float:
    """The fraction p of pixels the i-th proposal changes."""
    scaled = int(i / max(queries, 1) * 10000)
    return p_init / 2 ** sum(scaled > t for t in _HALVINGS)


def _signs(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1


def _windows(n: int, h: int, w: int, s: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n, 1, h, w) bool masks of one random s × s window each."""
    r0 = torch.randint(0, h - s + 1, (n, 1), generator=generator, device=device)
    c0 = torch.randint(0, w - s + 1, (n, 1), generator=generator, device=device)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_r = (rows >= r0) & (rows < r0 + s)  # (n, h)
    in_c = (cols >= c0) & (cols < c0 + s)  # (n, w)
    return (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1)


@torch.no_grad()
def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    queries: int = 5000,
    p_init: float = 0.8,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """Square attack; x (B, C, H, W), y (B,) -> x_adv inside the threat model."""
    x = x.detach()
    b, c, h, w = x.shape
    e = radii(threat, x, eps).view(-1, 1, 1, 1)
    unit = threat.norm_of(torch.ones_like(x[:1]))  # ‖1‖_p of a whole image
    with preserve_state(model):
        x_adv = project(threat, x + _signs((b, c, 1, w), generator, x.device) * e / unit, x, e.view(-1))
        m = margin(model(x_adv), y)
        for i in range(queries):
            idx = (m > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            s = max(1, min(h, w, round(math.sqrt(window_fraction(i, queries, p_init) * h * w))))
            mask = _windows(idx.numel(), h, w, s, generator, x.device).expand(-1, c, -1, -1).to(x.dtype)
            v = e[idx] / threat.norm_of(mask)[:, None, None, None]
            delta = x_adv[idx] - x[idx]
            proposal = delta * (1 - mask) + mask * _signs((idx.numel(), c, 1, 1), generator, x.device) * v
            cand = project(threat, x[idx] + proposal, x[idx], e[idx].view(-1))
            m_new = margin(model(cand), y[idx])
            better = m_new < m[idx]
            x_adv[idx[better]] = cand[better]
            m[idx[better]] = m_new[better]
    return x_adv
