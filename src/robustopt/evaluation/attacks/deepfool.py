"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016): a minimal perturbation by repeated linearisation.

At the current point, with ``f_k = z_k − z_y`` and ``w_k = ∇f_k`` for every wrong class k,
the linearised classifier changes its label after moving ``|f_k| / ‖w_k‖_q`` along the unit
ℓp direction ``d_k`` that maximises ``⟨d_k, w_k⟩ = ‖w_k‖_q`` (``q`` the dual norm). DeepFool
takes the closest such boundary, ``l = argmin_k |f_k| / ‖w_k‖_q``, steps

    r = (|f_l| + 10⁻⁴) / ‖w_l‖_q · d_l,

accumulates ``r_tot``, and stops per example once the label flips. The returned point is
``clip(x + (1 + overshoot)·r_tot)``. For ℓ2 ``d = w/‖w‖₂``; for ℓ∞ ``d = sign(w)``; both come
from the norm's ``ascent_direction``. On an affine classifier one step lands exactly on the
nearest decision boundary (the exact minimal distance, times 1 + overshoot).
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.threat.model import ThreatModel, get_norm
from robustopt.threat.perturb import attack_state

Tensor = torch.Tensor


def _class_gradients(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (A, K) and their input gradients (A, K, ...): one backward pass per class."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x).float()
        k = logits.shape[1]
        grads = [torch.autograd.grad(logits[:, i].sum(), x, retain_graph=i + 1 < k)[0] for i in range(k)]
    return logits.detach(), torch.stack(grads, dim=1)


def deepfool_step(logits: Tensor, grads: Tensor, y: Tensor, norm: str) -> Tensor:
    """The DeepFool step r (A, ...) from logits (A, K), gradients (A, K, ...) and labels (A,)."""
    geom = get_norm(norm)
    a, k = logits.shape
    f = logits - logits.gather(1, y[:, None])  # (A, K), < 0 for k ≠ y while correct
    w = grads - grads[torch.arange(a), y].unsqueeze(1)  # (A, K, ...)
    dual = geom.dual_norm(w.reshape(a * k, *w.shape[2:])).view(a, k).clamp_min(1e-12)
    dist = (f.abs() / dual).scatter(1, y[:, None], float("inf"))
    best = dist.argmin(dim=1)  # (A,)
    w_l = w[torch.arange(a), best]
    scale = (f.gather(1, best[:, None]).squeeze(1).abs() + 1e-4) / dual.gather(1, best[:, None]).squeeze(1)
    return geom.ascent_direction(w_l) * scale.view(-1, *([1] * (w_l.dim() - 1)))


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 50,
    overshoot: float = 0.02,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DeepFool in the threat's norm; the result is projected onto the threat (its ε caps the perturbation).

    Paper: Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
    deep neural networks", CVPR 2016.

    Distance: the threat's norm (ℓ2, ℓ∞, ℓ1). DeepFool looks for the *smallest* perturbation
    that changes the label; a perturbation longer than ε is pulled back onto the ball (where it
    usually no longer fools the model). To measure minimal perturbations, pass a threat whose ε
    is at least the box's diameter, as :func:`robustopt.evaluation.stability.minimal_perturbations` does.

    Arguments:
        steps (int): linearisations at most; one step is one forward pass and K backward passes
            (K classes) on the examples not yet flipped. Default 50.
        overshoot (float): the final ``r_tot`` is scaled by ``1 + overshoot``. Default 0.02.
        generator: accepted for the protocol; DeepFool is deterministic.

    Examples already misclassified are returned unchanged; an example not flipped within
    ``steps`` iterations is returned at its last iterate (callers check the label).

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = deepfool(model, x, y, ThreatModel("l2", 10.0), steps=10)
        >>> r = ThreatModel("l2", 10.0).norm_of(x_adv - x)  # (B,) minimal ℓ2 distances
    """
    x = x.detach()
    r_tot = torch.zeros_like(x)
    x_adv = x.clone()
    with attack_state(model, "deepfool"):
        for _ in range(steps):
            with torch.no_grad():
                active = (model(x_adv).argmax(1) == y).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            logits, grads = _class_gradients(model, x_adv[active])
            r_tot[active] += deepfool_step(logits, grads, y[active], threat.norm)
            x_adv[active] = threat.clip(x[active] + (1 + overshoot) * r_tot[active])
    return threat.project(x_adv, x)


ATTACKS = {"deepfool": deepfool}
