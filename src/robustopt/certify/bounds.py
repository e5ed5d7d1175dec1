"""Provable bounds on a network over a threat model's set: interval (IBP) and backward linear (CROWN) bounds.

Notation: the graph's nodes ``z_i`` (see :mod:`robustopt.certify.layers`), the input set
``S(x) = {x' : ‖x' − x‖_p ≤ ε, lo ≤ x' ≤ hi}``.

* **IBP** (Gowal et al. 2018): boxes ``[l_i, u_i] ∋ z_i(x')`` for all ``x' ∈ S(x)``, pushed forward in
  centre–radius form (``W m + b ± |W| r`` for affine maps, monotone maps on the ends). The input box is
  ``[max(x − ε, lo), min(x + ε, hi)]``; for ℓ2 the first linear layer also uses its row norms,
  ``W x + b ± ε‖W_j‖₂``, intersected with the box.
* **CROWN** (Zhang et al. 2018): a lower bound of ``A z_k`` by going backward: every affine map is
  transposed (``A ← A W``, constant ``+ A b``); every ReLU ``σ(z)`` with pre-activation bounds ``l < 0 < u``
  is replaced by a line below it where ``A ≥ 0`` (slope 1 if ``u ≥ −l`` else 0, the adaptive choice, or
  always 0) and the chord ``u (z − l)/(u − l)`` above it where ``A < 0``. At the input,
  ``min_{x' ∈ S(x)} A x' ≥ max(A x − ε‖A‖_q, Σ min(A lo', A hi'))`` (q the dual norm; exact for ℓ∞).
* **CROWN-IBP** (Zhang et al. 2020): the ReLUs' pre-activation bounds come from IBP. **Full CROWN**:
  they come from CROWN itself (layer by layer, intersected with IBP), only for neurons IBP leaves unstable.
* The margin specification ``C`` (rows ``e_y − e_j``) is applied to the last linear layer before any
  bound is taken (the elided last layer of the CROWN-IBP paper), for IBP as well.

Shapes: x (N, *in); boxes (N, *shape_i); specification rows A (N, S, *shape_i); bounds (N, S).
Everything here is differentiable in the weights (certified training backpropagates through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustopt.certify.layers import AddOp, ConvOp, Graph, LinearOp, MaxPoolOp, ReluOp
from robustopt.errors import ConfigError
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor
Box = tuple[Tensor, Tensor]
SLOPES = ("adaptive", "zero")


@dataclass(frozen=True)
class InputSet:
    """The threat model's set around a batch: centre ``x`` and the bounding box ``[lo, hi]`` of ball ∩ domain."""

    x: Tensor
    lo: Tensor
    hi: Tensor
    threat: ThreatModel

    @classmethod
    def around(cls, x: Tensor, threat: ThreatModel) -> InputSet:
        # Every ℓp ball (p ≥ 1) lies inside the ℓ∞ ball of the same radius.
        return cls(x, (x - threat.eps).clamp(*threat.bounds), (x + threat.eps).clamp(*threat.bounds), threat)


def interval_bounds(graph: Graph, inp: InputSet, crown_slope: str | None = None) -> list[Box]:
    """IBP boxes for every node. With ``crown_slope``, pre-activation boxes are tightened by CROWN (full CROWN)."""
    boxes: list[Box] = [(inp.lo, inp.hi)]
    balls: dict[int, tuple[Tensor, Tensor]] = {0: (inp.x, torch.ones_like(inp.x[:1]))} if inp.threat.norm == "l2" else {}
    refine = _preactivations(graph) if crown_slope is not None else set()
    for i, node in enumerate(graph[1:], 1):
        box = _interval_step(node.op, [boxes[j] for j in node.inputs])
        if node.op.affine and node.inputs[0] in balls:
            box = _intersect(box, _l2_step(node.op, balls, i, node.inputs[0], inp.threat.eps))
        if i in refine:
            box = _intersect(box, _crown_box(graph, i, boxes + [box], inp, crown_slope))
        boxes.append(box)
    return boxes


def _interval_step(op: object, inputs: list[Box]) -> Box:
    if isinstance(op, AddOp):
        return inputs[0][0] + inputs[1][0], inputs[0][1] + inputs[1][1]
    lo, hi = inputs[0]
    if isinstance(op, ReluOp):
        return lo.clamp_min(0), hi.clamp_min(0)
    if isinstance(op, MaxPoolOp):
        return op.module(lo), op.module(hi)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    mid, rad = op.forward(mid), op.absolute(rad)
    return mid - rad, mid + rad


def _l2_step(op: object, balls: dict[int, tuple[Tensor, Tensor]], i: int, j: int, eps: float) -> Box | None:
    """ℓ2 ball image while the path from the input is elementwise-scaled: ``z = c + s ⊙ δ``, ``‖δ‖₂ ≤ ε``.

    A linear or conv layer on such a node has the exact interval ``W c + b ± ε‖W_j ⊙ s‖₂`` (the
    squared row norms are the layer applied to ``s²`` with squared weights). Returns None otherwise."""
    centre, s = balls[j]
    if isinstance(op, (LinearOp, ConvOp)):
        sq = op.forward_squared(s * s)  # (1, *shape_i): Σ_k W_jk² s_k²
        rad = eps * sq.clamp_min(0).sqrt()
        mid = op.forward(centre)
        return mid - rad, mid + rad
    if getattr(op, "elementwise", False):  # channel scale, reshape, zero padding: still a scaled copy of δ
        balls[i] = (op.forward(centre), op.absolute(s))
    return None


def _intersect(a: Box, b: Box | None) -> Box:
    if b is None:
        return a
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])


def _preactivations(graph: Graph) -> set[int]:
    """Nodes feeding a ReLU whose IBP box is not already exact (some nonlinearity lies between them and the input)."""
    behind: list[bool] = []
    feeds: set[int] = set()
    for node in graph:
        behind.append(any(behind[j] or isinstance(graph[j].op, (ReluOp, MaxPoolOp)) for j in node.inputs))
        if isinstance(node.op, ReluOp):
            feeds.add(node.inputs[0])
    return {i for i in feeds if behind[i]}


def _crown_box(graph: Graph, i: int, boxes: list[Box], inp: InputSet, slope: str) -> Box | None:
    """CROWN bounds of node ``i`` for the neurons IBP leaves unstable in some example of the batch."""
    lo, hi = boxes[i]
    n = lo.shape[0]
    flat_lo, flat_hi = lo.reshape(n, -1), hi.reshape(n, -1)
    idx = ((flat_lo < 0) & (flat_hi > 0)).any(dim=0).nonzero().squeeze(1)  # (M,)
    if idx.numel() == 0:
        return None
    rows = torch.zeros(idx.numel(), flat_lo.shape[1], dtype=lo.dtype, device=lo.device)
    rows[torch.arange(idx.numel(), device=lo.device), idx] = 1.0
    spec = torch.cat([rows, -rows]).reshape(1, 2 * idx.numel(), *lo.shape[1:]).expand(n, -1, *lo.shape[1:])
    bound = backward_bound(graph, i, spec, boxes, inp, slope)  # (N, 2M)
    new_lo, new_hi = flat_lo.clone(), flat_hi.clone()
    new_lo[:, idx] = bound[:, : idx.numel()]
    new_hi[:, idx] = -bound[:, idx.numel() :]
    return new_lo.reshape(lo.shape), new_hi.reshape(hi.shape)


def backward_bound(graph: Graph, start: int, spec: Tensor, boxes: list[Box], inp: InputSet, slope: str = "adaptive") -> Tensor:
    """CROWN: a lower bound of ``spec · z_start`` over the input set, (N, S), given pre-activation boxes."""
    if slope not in SLOPES:
        raise ConfigError(f"certify: unknown ReLU lower slope {slope!r}: choose one of {', '.join(SLOPES)}")
    pending: dict[int, Tensor] = {start: spec}
    const = spec.new_zeros(spec.shape[:2])
    for i in range(start, 0, -1):
        a = pending.pop(i, None)
        if a is None:
            continue
        op, inputs = graph[i].op, graph[i].inputs
        if isinstance(op, MaxPoolOp):
            raise ConfigError(
                "certify: MaxPool2d is supported by interval bounds only; use IBP (method 'ibp': --method ibp "
                "to train, --certify ibp or --method ibp to certify)"
            )
        if isinstance(op, ReluOp):
            a, c = _relax_relu(a, *boxes[inputs[0]], slope)
            const = const + c
        elif not isinstance(op, AddOp):
            bias = op.bias_term(a)
            const = const if bias is None else const + bias
            a = op.transpose(a)
        for j in inputs:
            pending[j] = a if j not in pending else pending[j] + a
    return const + _concretize(pending[0], inp)


def _relax_relu(a: Tensor, lo: Tensor, hi: Tensor, slope: str) -> tuple[Tensor, Tensor]:
    """Replace ``a · relu(z)`` by ``a' · z + c`` ≤ it for every z in [lo, hi]: (N, S, *shape) -> (same, (N, S))."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    unstable = (lo < 0) & (hi > 0)
    active = (lo >= 0).to(a.dtype)
    chord = hi / (hi - lo).clamp_min(1e-12)
    up_slope = torch.where(unstable, chord, active)
    up_bias = torch.where(unstable, -chord * lo, torch.zeros_like(chord))
    low = (hi >= -lo).to(a.dtype) if slope == "adaptive" else torch.zeros_like(active)
    low_slope = torch.where(unstable, low, active)
    a_pos, a_neg = a.clamp_min(0), a.clamp_max(0)
    return a_pos * low_slope + a_neg * up_slope, (a_neg * up_bias).flatten(2).sum(-1)


def _concretize(a: Tensor, inp: InputSet) -> Tensor:
    """``min_{x' ∈ S(x)} a · x'`` from below, (N, S, *in) -> (N, S): the box bound, and the dual-norm ball bound."""
    mid, rad = ((inp.hi + inp.lo) / 2).unsqueeze(1), ((inp.hi - inp.lo) / 2).unsqueeze(1)
    box = (a * mid).flatten(2).sum(-1) - (a.abs() * rad).flatten(2).sum(-1)
    if inp.threat.norm == "linf":
        return box  # the box is exactly ball ∩ domain
    n, s = a.shape[:2]
    dual = inp.threat.dual_norm(a.reshape(n * s, *a.shape[2:])).reshape(n, s)
    ball = (a * inp.x.unsqueeze(1)).flatten(2).sum(-1) - inp.threat.eps * dual
    return torch.maximum(box, ball)


def margin_spec(y: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """C (N, K, K) with row j = e_y − e_j (row y is zero): C z is the margin of the true class over each class."""
    eye = torch.eye(k, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def ibp_margins(graph: Graph, boxes: list[Box], spec: Tensor) -> Tensor:
    """IBP lower bound of ``spec · logits``, (N, S); a last Linear layer is folded into the specification first."""
    last = graph[-1]
    if isinstance(last.op, LinearOp):
        lo, hi = boxes[last.inputs[0]]
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        w = spec @ last.op.weight  # (N, S, D)
        bound = (w @ mid.unsqueeze(-1)).squeeze(-1) - (w.abs() @ rad.unsqueeze(-1)).squeeze(-1)
        return bound if last.op.bias is None else bound + spec @ last.op.bias
    lo, hi = (b.flatten(1).unsqueeze(-1) for b in boxes[-1])
    return (spec.clamp_min(0) @ lo + spec.clamp_max(0) @ hi).squeeze(-1)


def crown_margins(graph: Graph, boxes: list[Box], spec: Tensor, inp: InputSet, slope: str = "adaptive") -> Tensor:
    """CROWN lower bound of ``spec · logits``, (N, S), from the given pre-activation boxes."""
    return backward_bound(graph, len(graph) - 1, spec.reshape(*spec.shape[:2], *graph[-1].shape), boxes, inp, slope)
