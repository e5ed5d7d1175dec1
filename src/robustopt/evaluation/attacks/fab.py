"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), targeted version (FAB-T).

A minimal-perturbation attack: it looks for the smallest ``‖δ‖_p`` that changes the label,
and counts as a success only where that smallest δ is inside the threat's ε. Per example,
with clean point ``x₀`` (D,), label y and target class t, FAB repeats ``steps`` times:

1. linearise ``g = z_t − z_y`` at the current iterate ``x_k``:
   ``g(z) ≈ g(x_k) + ⟨w, z − x_k⟩`` with ``w = ∇g(x_k)`` (one backward pass);
2. project both ``x_k`` and ``x₀`` onto the hyperplane ``{g_lin = 0}`` ∩ box in ℓp
   (:func:`hyperplane_step`, exact: box-constrained minimal-norm solution of one linear
   equation), giving steps ``δ_k`` and ``δ₀``;
3. bias towards the original point:
   ``α = min(‖δ_k‖ / (‖δ_k‖ + ‖δ₀‖), α_max)``,
   ``x_{k+1} = clip((1 − α)(x_k + η δ_k) + α(x₀ + η δ₀))`` with overshoot η = 1.05;
4. if ``x_{k+1}`` is misclassified, remember it when it is the closest so far, then step
   back towards x₀: ``x_{k+1} ← x₀ + β(x_{k+1} − x₀)``, β = 0.9.

FAB-T runs this against the ``n_targets`` most likely wrong classes of the clean point in
turn (AutoAttack "standard": 9 targets, 100 iterations, α_max = 0.1, η = 1.05, β = 0.9, no
random start), each only on the examples not yet broken within ε.
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.evaluation.attacks._common import _bcast, over_targets, target_classes
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import attack_state

Tensor = torch.Tensor
ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9


def _linear_room(w: Tensor, c: Tensor, room: Tensor, d: Tensor) -> Tensor:
    """ℓ2/ℓ∞: δ_i = clip(s·d_i) along d (|d_i| > 0 where w_i ≠ 0), s ≥ 0 the smallest with ⟨w, δ⟩ = |c|.

    Shapes (B, D). ``room`` is how far each coordinate may move in its direction (≥ 0), ``d``
    the (non-negative) speed of each coordinate. h(s) = Σ|w_i|·min(s·d_i, room_i) is piecewise
    linear and increasing; its breakpoints s_i = room_i/d_i are sorted and the segment holding
    |c| is solved exactly. When even h(∞) < |c| every coordinate moves all its room.
    """
    aw = w.abs()
    bp = torch.where(d > 0, room / d.clamp_min(1e-30), torch.full_like(d, float("inf")))
    bp, order = bp.sort(dim=1)
    aw_s, d_s, room_s = aw.gather(1, order), d.gather(1, order), room.gather(1, order)
    full = torch.where(torch.isfinite(bp), aw_s * room_s, torch.zeros_like(bp)).cumsum(1)  # Σ_{j≤k} |w_j| room_j
    slope = (aw_s * d_s).flip(1).cumsum(1).flip(1)  # Σ_{j≥k} |w_j| d_j
    h_at_bp = torch.where(torch.isfinite(bp), full - aw_s * room_s + bp * slope, torch.full_like(bp, float("inf")))
    k = (h_at_bp < c.abs()[:, None]).sum(1, keepdim=True)  # the segment (before breakpoint k) that reaches |c|
    done_before = torch.cat([torch.zeros_like(full[:, :1]), full], 1).gather(1, k)
    rate = torch.cat([slope, torch.zeros_like(slope[:, :1])], 1).gather(1, k)
    s = ((c.abs()[:, None] - done_before) / rate.clamp_min(1e-30)).where(rate > 0, torch.full_like(rate, float("inf")))
    return torch.where(d > 0, torch.minimum(s * d, room), torch.zeros_like(room))  # d = 0: inf·0 would be NaN


def _l1_greedy(w: Tensor, c: Tensor, room: Tensor) -> Tensor:
    """ℓ1: move the coordinates of largest |w_i| first, each by up to its room, until ⟨w, δ⟩ = |c|."""
    aw, order = w.abs().sort(dim=1, descending=True)
    room_s = room.gather(1, order)
    gain = (aw * room_s).cumsum(1)  # ⟨w, δ⟩ reached after filling the first k coordinates
    need = c.abs()[:, None]
    before = gain - aw * room_s
    amount = torch.where(gain <= need, room_s, ((need - before) / aw.clamp_min(1e-30)).clamp(0) * (before < need))
    return torch.zeros_like(w).scatter(1, order, amount.minimum(room_s))


def hyperplane_step(threat: ThreatModel, p: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """The ℓp-smallest δ (B, D) with ⟨w, δ⟩ = c and p + δ in the box, or as close as the box allows.

    p, w (B, D); c (B,). Each coordinate moves in the direction sign(c·w_i); for ℓ2 its speed
    is |w_i| (δ = clip(λw), the KKT solution), for ℓ∞ 1 (δ = clip(t·sign w)), for ℓ1 the
    coordinates are filled greedily by |w_i| (the ratio of progress to ℓ1 cost).
    """
    lo, hi = threat.bounds
    direction = torch.sign(c)[:, None] * torch.sign(w)  # (B, D), ±1 or 0
    room = torch.where(direction > 0, hi - p, lo - p).abs() * (direction != 0)
    if threat.norm == "l1":
        mag = _l1_greedy(w, c, room)
    else:
        mag = _linear_room(w, c, room, threat.ascent_direction(w).abs() * (direction != 0))
    return direction * mag


def _target_gradient(model: nn.Module, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """g = z_t − z_y (B,) and ∇ₓg (B, ...) in one backward pass."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        z = model(x).float()
        g = z.gather(1, t[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(g.sum(), x)
    return g.detach(), grad


def fab_run(model: nn.Module, x0: Tensor, y: Tensor, target: Tensor, threat: ThreatModel, steps: int) -> tuple[Tensor, Tensor]:
    """One FAB-T trajectory from x0 (B, ...); (closest misclassified point found, its norm (B,), inf if none)."""
    b = x0.shape[0]
    flat0 = x0.reshape(b, -1)
    x_k = x0.clone()
    best, best_norm = x0.clone(), torch.full((b,), float("inf"), device=x0.device)
    for _ in range(steps):
        g, grad = _target_gradient(model, x_k, y, target)
        w = grad.reshape(b, -1)
        flat_k = x_k.reshape(b, -1)
        c_k = -g  # the linearisation is 0 at x_k + δ iff ⟨w, δ⟩ = −g(x_k)
        c_0 = -(g + (w * (flat0 - flat_k)).sum(1))  # and at x₀ + δ iff ⟨w, δ⟩ = −g_lin(x₀)
        d_k = hyperplane_step(threat, flat_k, w, c_k).reshape(x0.shape)
        d_0 = hyperplane_step(threat, flat0, w, c_0).reshape(x0.shape)
        n_k, n_0 = threat.norm_of(d_k).clamp_min(1e-8), threat.norm_of(d_0).clamp_min(1e-8)
        alpha = _bcast((n_k / (n_k + n_0)).clamp(0, ALPHA_MAX), x0)
        x_k = threat.clip((1 - alpha) * (x_k + ETA * d_k) + alpha * (x0 + ETA * d_0))
        with torch.no_grad():
            adv = model(x_k).argmax(1) != y
        dist = threat.norm_of(x_k - x0)
        closer = adv & (dist < best_norm)
        best[closer], best_norm = x_k[closer], torch.where(closer, dist, best_norm)
        x_k = torch.where(_bcast(adv, x0), x0 + BETA * (x_k - x0), x_k)
    return best, best_norm


def _fab_towards(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, rank: int, steps: int) -> Tensor:
    """FAB towards each example's ``rank``-th most likely wrong class: the closest point found where it is within ε, else x."""
    cand, dist = fab_run(model, x, y, target_classes(model, x, y, rank + 1)[:, rank], threat, steps)
    return torch.where(_bcast(dist <= threat.eps * (1 + 1e-6), x), cand, x)


def fab_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    n_targets: int = 9,
    generator: torch.Generator | None = None,
) -> Tensor:
    """FAB-T: a misclassified point within ε where FAB finds one against one of the top wrong classes, else x.

    Paper: Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
    attack", ICML 2020 (FAB-T as run by AutoAttack "standard").

    Distance: the threat's norm (ℓ∞, ℓ2, ℓ1); a minimal-perturbation search counted only within ε.

    Arguments:
        steps (int): FAB iterations per target; one step is one forward and backward pass. Default 100.
        n_targets (int): how many target classes at most (``min(n_targets, K − 1)``). Default 9.
        generator: accepted for the protocol; the standard version has no random start.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = fab_targeted(model, x, y, ThreatModel("linf", 0.1), steps=5, n_targets=2)
        >>> bool(ThreatModel("linf", 0.1).contains(x_adv, x).all())
        True
    """
    x = x.detach()
    with attack_state(model, "fab-t"):
        return over_targets(model, x, y, threat, n_targets, _fab_towards, steps=steps)


ATTACKS = {"fab-t": fab_targeted}
