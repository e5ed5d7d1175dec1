"""The inner maximisation: one generic loop for every norm and every number of steps.

``perturb`` approximately solves ``max_{x' ∈ S(x)} J(θ, x', y)`` with ``S(x)`` a
:class:`~robustopt.threat.model.ThreatModel` set.

* ``steps=1`` (default) is the paper's first-order closed form (Shaham et al., arXiv
  1511.05432, Sec. 3): ``x' = clip(x + ε·d)`` with ``d`` the steepest-ascent direction of
  ``g = ∇ₓJ``: ``sign(g)`` for ℓ∞ (FGSM), ``g/‖g‖₂`` for ℓ2, one signed coordinate for ℓ1.
* ``steps>1`` is projected gradient ascent (Madry et al. 2018), each iterate projected back
  onto ball ∩ box; ℓ1 takes sparse top-k steps.

Only input gradients are computed (``torch.autograd.grad`` w.r.t. the input), so no weight
gradients are formed or accumulated.

BatchNorm choice: the model is attacked in whatever mode the caller has it in. During
training that is train mode, so the perturbation is built against the same batch-statistics
forward pass that the optimiser step will see. Running statistics are snapshotted and
restored, so attack passes never move them (see :func:`preserve_state`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.errors import ConfigError, DataError
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits (B, C), labels (B,)) -> per-example loss (B,)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy, (B, C), (B,) -> (B,)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def check_inputs(x: Tensor, y: Tensor | None, threat: ThreatModel, where: str = "perturb") -> None:
    """Refuse inputs an attack cannot honour: empty, non-float, NaN/inf, outside ``threat.bounds``, or labels that do not match.

    One pass over x (a min, a max and a finiteness test), cheap next to a forward pass. The
    threat model promises points in ball ∩ box, which is only possible when x is in the box.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{where}: x must be a non-empty batch (B, ...) of inputs, got {shape}")
    if not x.is_floating_point():
        raise DataError(f"{where}: x has dtype {x.dtype}; convert images to float in {threat.bounds} (e.g. x.float() / 255)")
    finite, x_min, x_max = torch.stack([torch.isfinite(x).all().to(x.dtype), x.min(), x.max()]).tolist()  # one sync
    if not finite:
        raise DataError(f"{where}: x contains NaN or infinite values; clean the inputs first")
    lo, hi = threat.bounds
    if x_min < lo - 1e-6 or x_max > hi + 1e-6:
        raise DataError(
            f"{where}: inputs span [{x_min:g}, {x_max:g}], outside the threat model's bounds {threat.bounds}; "
            f"scale them into the bounds (e.g. x / 255) or pass ThreatModel(..., bounds=(lo, hi))"
        )
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.is_floating_point()):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"{where}: y must be integer labels of shape ({x.shape[0]},), got {got}")


def check_step_size(step_size: float | None, where: str = "perturb") -> None:
    """A step size must be a finite number > 0 (None picks the default)."""
    if step_size is not None and not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ConfigError(f"{where}: step_size must be a finite number > 0, got {step_size!r}")


@contextlib.contextmanager
def preserve_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore the model's train/eval flags and BatchNorm running statistics on exit.

    Cheap: only BatchNorm buffers are copied, never weights.
    """
    modes = [(m, m.training) for m in model.modules()]
    bn_buffers = [
        (buf, buf.detach().clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers()
    ]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buf, saved in bn_buffers:
                buf.copy_(saved)
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily mark every parameter as not requiring grad.

    Autograd then records no weight-gradient work at all (custom autograd functions such as
    the first conv of ``paper-mnist`` only see ``needs_input_grad``, not what was asked for).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = cross_entropy) -> tuple[Tensor, Tensor]:
    """∇ₓ Σ_i J(x_i, y_i) and the logits, without forming weight gradients.

    Shapes: x (B, C, H, W), y (B,) -> grad (B, C, H, W), logits (B, K).
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, y).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 1,
    step_size: float | None = None,
    random_start: bool = False,
    loss_fn: LossFn = cross_entropy,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Build adversarial examples inside ``threat`` by (projected) steepest ascent.

    Args:
        model: maps (B, C, H, W) inputs in ``threat.bounds`` to logits (B, K).
        x: clean inputs (B, C, H, W); y: labels (B,).
        threat: the norm, ε and domain.
        steps: 1 is the paper's first-order step; more is PGD.
        step_size: ascent step α per iteration; default ε for one step, 2.5ε/steps otherwise.
        random_start: start from a uniform point of the ball (Madry et al.; Wong et al.).
        loss_fn: per-example loss to ascend, ``(logits, y) -> (B,)``.
        generator: seeds the random start.
        x_init: start from this point instead (projected first); used by restarts and replays.
        check: validate x (finite, inside the bounds). The training loop validated its data once up
            front and passes False, which saves a device synchronisation per minibatch.

    Returns:
        x_adv (B, C, H, W), detached, inside ball ∩ box.

    Example:
        >>> x_adv = perturb(model, x, y, ThreatModel("linf", 0.1))            # FGSM
        >>> x_adv = perturb(model, x, y, ThreatModel("l2", 1.0), steps=40, random_start=True)
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"perturb: steps must be an integer >= 1, got {steps!r}")
    check_step_size(step_size)
    if check:
        check_inputs(x, None, threat)  # y is whatever loss_fn takes (labels, or TRADES' clean probabilities)
    alpha = threat.default_step_size(steps) if step_size is None else step_size
    x = x.detach()
    if x_init is not None:
        x_adv = threat.project(x_init.detach(), x)
    elif random_start:
        x_adv = threat.random_init(x, generator)
    else:
        x_adv = x.clone()
    with preserve_state(model), frozen_parameters(model):
        for _ in range(steps):
            grad, _ = input_gradient(model, x_adv, y, loss_fn)
            x_adv = ascend(threat, x_adv, x, grad, alpha, iterative=steps > 1)
    return x_adv.detach()


def ascend(threat: ThreatModel, x_adv: Tensor, x: Tensor, grad: Tensor, step_size: float, *, iterative: bool) -> Tensor:
    """One projected steepest-ascent step: ``Π_{S(x)}(x_adv + α·d(g))``; all shapes (B, C, H, W).

    With ``x_adv = x``, ``α = ε`` and ``iterative=False`` this is the paper's closed form."""
    return threat.project(x_adv + step_size * threat.ascent_direction(grad, iterative=iterative), x)
