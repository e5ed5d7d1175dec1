"""``certify(model, x, y, threat)``: a guaranteed lower bound on robust accuracy, next to every attack's upper bound.

An example is *verified* when a lower bound on each margin ``z_y(x') − z_j(x')``, ``j ≠ y``, over the whole
threat set ``{x' : ‖x' − x‖_p ≤ ε, x' ∈ bounds}`` is positive: no attack can change its prediction. Verified
accuracy therefore never exceeds the accuracy under any attack.

Methods:

* ``"ibp"``: interval bound propagation (Gowal et al. 2018); any supported layer, MaxPool2d included.
* ``"crown-ibp"``: CROWN's backward linear bound on the margins with IBP pre-activation bounds (Zhang et al. 2020).
* ``"crown"``: full CROWN (Zhang et al. 2018): pre-activation bounds by CROWN too; tighter, costlier.
* ``"smoothing"``: randomized smoothing for ℓ2 (Cohen et al. 2019), for any model; see
  :mod:`robustopt.certify.smoothing`. It certifies the *smoothed* classifier, not ``model`` itself.

For the bound methods, the reported margin bound is the larger of the CROWN and IBP bounds (both are sound),
so ``crown`` and ``crown-ibp`` are never looser than ``ibp``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from robustopt.certify.bounds import InputSet, crown_margins, ibp_margins, interval_bounds, margin_spec
from robustopt.certify.layers import MaxPoolOp, build_graph
from robustopt.errors import ConfigError, DataError
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import check_inputs, preserve_state

Tensor = torch.Tensor
BOUND_METHODS = ("ibp", "crown-ibp", "crown")
METHODS = (*BOUND_METHODS, "smoothing")


@dataclass(frozen=True)
class CertifyResult:
    """What :func:`certify` proved about a batch.

    Attributes:
        margin_lower: (N, K) lower bounds on ``z_y − z_j`` over the threat set (``+inf`` at j = y); None for smoothing.
        verified: (N,) bool, the prediction provably cannot change (and it is correct).
        clean_correct: (N,) bool, the prediction at x is correct (smoothing: the smoothed prediction, not abstaining).
        verified_accuracy, clean_accuracy: means of the two masks.
        method, threat: what was certified; ``seconds`` the wall-clock time.
        radius: (N,) certified ℓ2 radius of the smoothed classifier (smoothing; 0 where wrong or abstaining).
        certified_accuracy: {radius: fraction certified correct at that radius} (smoothing).
    """

    margin_lower: Tensor | None
    verified: Tensor
    clean_correct: Tensor
    verified_accuracy: float
    clean_accuracy: float
    method: str
    threat: dict[str, Any]
    seconds: float
    radius: Tensor | None = None
    certified_accuracy: dict[float, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tensors become lists (``+inf`` margins become None)."""
        out = asdict(self)
        for key in ("margin_lower", "verified", "clean_correct", "radius"):
            value = out[key]
            if isinstance(value, Tensor):
                out[key] = [[None if math.isinf(v) else v for v in row] for row in value.tolist()] if value.dim() == 2 \
                    else value.tolist()  # fmt: skip
        out["certified_accuracy"] = {str(r): a for r, a in self.certified_accuracy.items()}
        out["n"] = int(self.verified.numel())
        return out


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    method: str = "crown",
    *,
    batch_size: int = 500,
    slope: str = "adaptive",
    **smoothing: Any,
) -> CertifyResult:
    """Certify ``model`` on (x, y) against ``threat``: verified accuracy is a lower bound on robust accuracy.

    Args:
        model: maps inputs in ``threat.bounds`` to logits (B, K); run in eval mode (restored afterwards).
        x: (N, ...) inputs in ``threat.bounds``; y: (N,) labels.
        threat: norm (linf, l2, l1 for the bound methods; l2 for smoothing), ε in pixel units, domain.
        method: ``crown`` (default), ``crown-ibp``, ``ibp`` or ``smoothing``.
        batch_size: examples per bound computation (full CROWN's memory grows with it).
        slope: CROWN's lower ReLU slope for unstable neurons, ``adaptive`` or ``zero``.
        **smoothing: ``sigma``, ``n``, ``n0``, ``alpha``, ``radii``, ``seed`` for ``method="smoothing"``.

    Example:
        >>> res = certify(model, x_test, y_test, ThreatModel("linf", 0.1), "crown")
        >>> res.verified_accuracy <= evaluate(model, x_test, y_test, "pgd", ThreatModel("linf", 0.1))["adversarial_accuracy"]
    """
    if method not in METHODS:
        raise ConfigError(f"unknown certify method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"certify: batch_size must be a whole number >= 1, got {batch_size!r}")
    check_inputs(x, y, threat, where="certify")
    threat_info = {"norm": threat.norm, "eps": threat.eps, "bounds": list(threat.bounds)}
    start = time.perf_counter()
    if method == "smoothing":
        from robustopt.certify.smoothing import smoothed_certify

        out = smoothed_certify(model, x, y, threat, batch_size=batch_size, **smoothing)
        return CertifyResult(None, out.verified, out.correct, _mean(out.verified), _mean(out.correct), method, threat_info,
                             time.perf_counter() - start, out.radius, out.certified_accuracy, out.options)  # fmt: skip
    if smoothing:
        raise ConfigError(f"certify: {', '.join(sorted(smoothing))} only apply to method='smoothing'")
    margins, correct = _bound_batches(model, x, y, threat, method, batch_size, slope)
    verified = (margins > 0).all(dim=1) & correct
    return CertifyResult(margins, verified, correct, _mean(verified), _mean(correct), method, threat_info,
                         time.perf_counter() - start, options={"slope": slope})  # fmt: skip


def check_supported(model: nn.Module, like: Tensor, method: str, *, flag: str = "method") -> None:
    """Refuse, in one line and before any costly work, a method or a model the certifier cannot bound.

    ``like``: inputs of the model's shape (one is used). ``flag`` names the option in the message (e.g. ``--certify``).
    Raises ConfigError naming the unsupported layer (or MaxPool2d under a CROWN method)."""
    if method not in BOUND_METHODS:
        raise ConfigError(f"unknown {flag} {method!r}: choose one of {', '.join(BOUND_METHODS)}")
    with preserve_state(model), torch.no_grad():
        model.eval()
        graph = build_graph(model, like[:1])
    if method != "ibp" and any(isinstance(node.op, MaxPoolOp) for node in graph):
        raise ConfigError(f"certify: {flag} {method} cannot bound MaxPool2d (interval bounds only); use {flag} ibp for this "
                          "model")  # fmt: skip


def _mean(mask: Tensor) -> float:
    return float(mask.float().mean())


def _bound_batches(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, method: str, batch_size: int, slope: str
) -> tuple[Tensor, Tensor]:
    """(margin lower bounds (N, K) with +inf at the label, clean-correct mask (N,)), in eval mode, no gradients."""
    margins, correct = [], []
    with preserve_state(model), torch.no_grad():
        model.eval()
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            logits = model(xb)
            if int(yb.max()) >= logits.shape[1] or int(yb.min()) < 0:
                k = logits.shape[1]
                raise DataError(f"certify: labels must be in [0, {k - 1}] for a model with {k} outputs")
            m = margin_bounds(model, xb, yb, threat, method, slope)
            margins.append(m.scatter(1, yb[:, None], math.inf))
            correct.append(logits.argmax(1) == yb)
    return torch.cat(margins), torch.cat(correct)


def margin_bounds(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, method: str, slope: str = "adaptive") -> Tensor:
    """Lower bounds (N, K) of ``z_y − z_j`` over the threat set (0 at j = y); differentiable in the weights.

    ``crown`` and ``crown-ibp`` return the elementwise maximum of the CROWN and IBP bounds."""
    graph = build_graph(model, x)
    inp = InputSet.around(x, threat)
    boxes = interval_bounds(graph, inp, crown_slope=slope if method == "crown" else None)
    spec = margin_spec(y, graph[-1].shape[0], x.dtype)
    bound = ibp_margins(graph, boxes, spec)
    if method != "ibp":
        bound = torch.maximum(bound, crown_margins(graph, boxes, spec, inp, slope))
    return bound
