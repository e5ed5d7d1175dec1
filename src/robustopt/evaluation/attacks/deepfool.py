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

Example:
    >>> x_adv = deepfool(model, x, y, norm="l2")            # (B, C, H, W)
    >>> r = (x_adv - x).flatten(1).norm(dim=1)              # (B,) minimal ℓ2 distances
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.threat.model import get_norm
from robustopt.threat.perturb import frozen_parameters, preserve_state

Tensor = torch.Tensor


def _class_gradients(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (A, K) and their input gradients (A, K, ...): one backward pass per class."""
    x = x.detach().requires_grad_(True)
    logits = model(x).float()
    grads = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < logits.shape[1])[0] for k in range(logits.shape[1])]
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
    norm: str = "l2",
    steps: int = 50,
    overshoot: float = 0.02,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """DeepFool in ``norm`` ("l2", "linf" or "l1"); x (B, C, H, W), y (B,) -> x_adv (B, C, H, W).

    Examples already misclassified are returned unchanged; an example not flipped within
    ``steps`` iterations is returned at its last iterate (callers check the label).
    """
    x = x.detach()
    r_tot = torch.zeros_like(x)
    x_adv = x.clone()
    with preserve_state(model), frozen_parameters(model):
        for _ in range(steps):
            with torch.no_grad():
                active = (model(x_adv).argmax(1) == y).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            logits, grads = _class_gradients(model, x_adv[active])
            r_tot[active] += deepfool_step(logits, grads, y[active], norm)
            x_adv[active] = (x[active] + (1 + overshoot) * r_tot[active]).clamp(*bounds)
    return x_adv.detach()
