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


def check_threat(threat: object, where: str = "perturb") -> None:
    """``threat`` must be a :class:`ThreatModel` (not None, not a norm name)."""
    if not isinstance(threat, ThreatModel):
        got = type(threat).__name__
        raise ConfigError(f"{where}: threat must be a ThreatModel such as ThreatModel('linf', 8 / 255), got {got}")


def check_module(model: object, where: str = "perturb") -> None:
    """``model`` must be a ``torch.nn.Module`` (its train/eval flags and BatchNorm statistics are restored after the attack)."""
    if not isinstance(model, nn.Module):
        got = type(model).__name__
        raise ConfigError(f"{where}: model must be a torch.nn.Module, got {got}; wrap a function in an nn.Module")


def check_grad_mode(where: str = "perturb") -> None:
    """Refuse ``torch.inference_mode()``, where no gradient can be computed; ``torch.no_grad()`` is fine."""
    if torch.is_inference_mode_enabled():
        raise ConfigError(f"{where} needs input gradients: run it outside torch.inference_mode() (torch.no_grad() is fine)")


def check_inputs(x: Tensor, y: Tensor | None, threat: ThreatModel, where: str = "perturb") -> None:
    """Refuse tensors an attack cannot honour: empty, non-float, NaN/inf, outside ``threat.bounds``, or labels that do not match.

    One pass over x (a min, a max and a finiteness test), cheap next to a forward pass. The
    threat model promises points in ball ∩ box, which is only possible when x is in the box.
    Labels must be integers of shape (B,) and >= 0; :func:`check_labels` checks them against
    the model's class count once logits exist.
    """
    check_threat(threat, where)
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
    if y is not None and y.dtype != torch.bool and int(y.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0, got {int(y.min())}; map them to 0 .. num_classes - 1")


def check_labels(logits: Tensor, y: Tensor, where: str = "perturb") -> None:
    """Logits must be (B, K) with K >= 2 and every label in 0 .. K - 1."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != y.shape[0] or logits.shape[1] < 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise DataError(f"{where}: the model returned {got}; it must return logits (B, num_classes >= 2)")
    if y.dtype == torch.bool or int(y.max()) >= logits.shape[1]:
        raise DataError(
            f"{where}: labels go up to {int(y.max())} but the model returns {logits.shape[1]} classes; "
            f"labels must be in 0 .. {logits.shape[1] - 1}"
        )


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


@contextlib.contextmanager
def attack_state(model: nn.Module, where: str = "perturb") -> Iterator[nn.Module]:
    """Everything an attack needs around the model, restored on exit.

    * gradients on (``torch.enable_grad``), so attacks run inside ``torch.no_grad()`` as in a
      validation step (torchattacks does the same); ``torch.inference_mode()`` is refused;
    * weights frozen (:func:`frozen_parameters`): no weight ``.grad`` is ever formed;
    * train/eval flags and BatchNorm statistics restored (:func:`preserve_state`).
    """
    check_grad_mode(where)
    with torch.enable_grad(), preserve_state(model), frozen_parameters(model):
        yield model


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = cross_entropy) -> tuple[Tensor, Tensor]:
    """∇ₓ Σ_i J(x_i, y_i) and the logits, without forming weight gradients.

    Shapes: x (B, ...), y (B,) -> grad (B, ...), logits (B, K). Gradients are on inside, so
    this works under ``torch.no_grad()``.
    """
    grad, logits, _ = evaluate(model, x, y, loss_fn)
    assert grad is not None
    return grad, logits


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = cross_entropy, *, gradient: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """One forward pass at x, and the input gradient from that same pass: (∇ₓ Σ_i J(x_i, y_i) or None, logits, J (B,)).

    An attack reads the loss and prediction of an iterate from the forward pass that gives its gradient, so
    an iterate costs one forward and one input-gradient backward, never an extra forward. ``gradient=False``
    (the last iterate of an attack, whose gradient nobody uses) runs the forward only, without autograd."""
    if not gradient:
        with torch.no_grad():
            logits = model(x)
            return None, logits, loss_fn(logits, y).detach()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, logits.detach(), loss.detach()


class WorstCase:
    """Per-example best-iterate tracker: keeps, per example, the best point found so far.

    A misclassified point beats any correctly classified one; among points of the same kind
    the higher loss wins (the first one seen on a tie). ``x`` starts at ``x_start``.
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


def _start(threat: ThreatModel, x: Tensor, x_init: Tensor | None, random_start: bool, generator, radius: Tensor | None) -> Tensor:
    """The first iterate: ``x_init`` projected, a uniform point of the ball, or x itself."""
    if x_init is not None:
        return threat.project(x_init.detach(), x, radius)
    if random_start:
        return threat.random_init(x, generator, radius)
    return x.clone()


def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 1,
    step_size: float | Tensor | None = None,
    random_start: bool = False,
    loss_fn: LossFn = cross_entropy,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
    check: bool = True,
    radius: Tensor | None = None,
    tracker: WorstCase | None = None,
) -> Tensor:
    """Build adversarial examples inside ``threat`` by (projected) steepest ascent.

    Args:
        model: maps inputs (B, ...) in ``threat.bounds`` to logits (B, K).
        x: clean inputs (B, ...); y: labels (B,) (or whatever ``loss_fn`` takes).
        threat: the norm, ε and domain.
        steps: 1 is the paper's first-order step; more is PGD.
        step_size: ascent step α per iteration, a number or one per example (B,); default ε for
            one step, 2.5ε/steps otherwise.
        random_start: start from a uniform point of the ball (Madry et al.; Wong et al.).
        loss_fn: per-example loss to ascend, ``(logits, y) -> (B,)``.
        generator: seeds the random start.
        x_init: start from this point instead (projected first); used by restarts and replays.
        check: validate x (finite, inside the bounds). The training loop validated its data once up
            front and passes False, which saves a device synchronisation per minibatch.
        radius: per-example radii (B,) instead of ε (the stability binary searches).
        tracker: a :class:`WorstCase` that sees every iterate, the last included (y must then be
            labels); the PGD attack returns its ``x``, the worst case over the whole path.

    Returns:
        x_adv (B, ...), the last iterate, detached, inside ball ∩ box. Works inside
        ``torch.no_grad()``; refuses ``torch.inference_mode()`` with a ConfigError.

    Example:
        >>> x_adv = perturb(model, x, y, ThreatModel("linf", 0.1))            # FGSM
        >>> x_adv = perturb(model, x, y, ThreatModel("l2", 1.0), steps=40, random_start=True)
    """
    _check_arguments(model, x, threat, steps, step_size, check)
    alpha = threat.default_step_size(steps) if step_size is None else step_size
    if isinstance(alpha, Tensor):
        alpha = alpha.reshape(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, ..., 1)
    x = x.detach()
    x_adv = _start(threat, x, x_init, random_start, generator, radius)
    with attack_state(model):
        for _ in range(steps):  # floor: one forward + one input-gradient backward per step (+ one forward with a tracker)
            grad, logits, loss = evaluate(model, x_adv, y, loss_fn)
            if tracker is not None:
                tracker.update(x_adv, loss, logits.argmax(1) != y)
            x_adv = ascend(threat, x_adv, x, grad, alpha, iterative=steps > 1, radius=radius)
        if tracker is not None:
            _, logits, loss = evaluate(model, x_adv, y, loss_fn, gradient=False)
            tracker.update(x_adv, loss, logits.argmax(1) != y)
    return x_adv.detach()


def _check_arguments(model: nn.Module, x: Tensor, threat: ThreatModel, steps: int, step_size, check: bool) -> None:
    """perturb's argument checks: a ConfigError or DataError with one line."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"perturb: steps must be an integer >= 1, got {steps!r}")
    if not isinstance(step_size, Tensor):
        check_step_size(step_size)
    check_module(model)
    check_threat(threat)
    if check:
        check_inputs(x, None, threat)  # y is whatever loss_fn takes (labels, or TRADES' clean probabilities)


def ascend(
    threat: ThreatModel,
    x_adv: Tensor,
    x: Tensor,
    grad: Tensor,
    step_size: float | Tensor,
    *,
    iterative: bool,
    radius: Tensor | None = None,
) -> Tensor:
    """One projected steepest-ascent step: ``Π_{S(x)}(x_adv + α·d(g))``; all shapes (B, ...).

    With ``x_adv = x``, ``α = ε`` and ``iterative=False`` this is the paper's closed form."""
    return threat.project(x_adv + step_size * threat.ascent_direction(grad, iterative=iterative), x, radius)
