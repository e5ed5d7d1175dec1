"""Threat models: a norm, a radius ε and the data domain.

This module is the only place in robustopt that knows what a norm is. Training's inner
maximisation and every attack use the same four pure operations:

* ``ascent_direction(g)``: the steepest-ascent direction ``d`` with ``‖d‖_p = 1`` and
  ``⟨d, g⟩ = ‖g‖_q`` (``q`` the dual norm), i.e. the maximiser of the linearised loss
  ``max_{‖δ‖_p ≤ 1} ⟨g, δ⟩`` (Shaham et al., arXiv 1511.05432, Sec. 3);
* ``project(x_adv, x)``: back onto the ball ``{x + δ : ‖δ‖_p ≤ ε}`` intersected with the box;
* ``random_init(x, generator)``: a uniform random point of the ball (then clipped to the box);
* ``norm(delta)``: the per-example norm.

Shapes: inputs are batches ``(B, ...)``; norms are taken per example over all other dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from robustopt.errors import ConfigError

Tensor = torch.Tensor


def _flat(t: Tensor) -> Tensor:
    """(B, ...) -> (B, D)."""
    return t.reshape(t.shape[0], -1)


def _per_example(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class LpNorm:
    """Base class: one ℓp geometry. Subclasses are stateless and pure."""

    name: str = field(init=False, default="")
    p: float = field(init=False, default=2.0)

    def norm(self, delta: Tensor) -> Tensor:
        """‖δ‖_p per example: (B, ...) -> (B,)."""
        return torch.linalg.vector_norm(_flat(delta), ord=self.p, dim=1)

    def dual_norm(self, g: Tensor) -> Tensor:
        """‖g‖_q per example with 1/p + 1/q = 1: (B, ...) -> (B,)."""
        q = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[self.p]
        return torch.linalg.vector_norm(_flat(g), ord=q, dim=1)

    def ascent_direction(self, g: Tensor, sparsity: float = 0.0) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def project_ball(self, delta: Tensor, eps: float) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def random_ball(self, like: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Linf(LpNorm):
    """ℓ∞: box geometry. Steepest ascent is ``sign(g)`` (FGSM, Goodfellow et al. 2015)."""

    name: str = field(init=False, default="linf")
    p: float = field(init=False, default=math.inf)

    def ascent_direction(self, g: Tensor, sparsity: float = 0.0) -> Tensor:
        return g.sign()

    def project_ball(self, delta: Tensor, eps: float) -> Tensor:
        return delta.clamp(-eps, eps)

    def random_ball(self, like: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (2 * u - 1) * eps


@dataclass(frozen=True)
class L2(LpNorm):
    """ℓ2: Euclidean ball. Steepest ascent is ``g / ‖g‖₂``."""

    name: str = field(init=False, default="l2")
    p: float = field(init=False, default=2.0)

    def ascent_direction(self, g: Tensor, sparsity: float = 0.0) -> Tensor:
        # Rescale by max|g| first: a very confident example's gradient can be ~1e-20, whose squared norm
        # underflows; dividing by a clamped norm would then return a step far shorter than ε.
        peak = _per_example(_flat(g).abs().amax(dim=1), g)
        u = torch.where(peak > 0, g / peak.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
        n = self.norm(u).clamp_min(1.0)  # ‖u‖ ≥ 1 unless u = 0 (max|u| = 1)
        return u / _per_example(n, u)

    def project_ball(self, delta: Tensor, eps: float) -> Tensor:
        n = self.norm(delta)
        scale = (eps / n.clamp_min(1e-12)).clamp(max=1.0)
        return delta * _per_example(scale, delta)

    def random_ball(self, like: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
        # Uniform in the ball: Gaussian direction, radius eps * U^(1/D).
        d = _flat(like).shape[1]
        z = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        u = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype)
        radius = eps * u.pow(1.0 / d)
        return self.ascent_direction(z) * _per_example(radius, like)


@dataclass(frozen=True)
class L1(LpNorm):
    """ℓ1: cross-polytope.

    The exact steepest-ascent direction puts all mass on one coordinate,
    ``sign(g_j) e_j`` with ``j = argmax |g_j|`` (the paper's ℓ1 closed form). For iterative
    attacks that single-coordinate step is too greedy, so ``sparsity > 0`` spreads the step
    over the top ``ceil(sparsity·D)`` coordinates by |g| (sparse ℓ1 descent, Tramèr & Boneh
    2019), still with unit ℓ1 norm.
    """

    name: str = field(init=False, default="l1")
    p: float = field(init=False, default=1.0)

    def ascent_direction(self, g: Tensor, sparsity: float = 0.0) -> Tensor:
        flat = _flat(g)
        k = max(1, math.ceil(sparsity * flat.shape[1]))
        idx = flat.abs().topk(k, dim=1).indices  # (B, k)
        d = torch.zeros_like(flat)
        d.scatter_(1, idx, flat.gather(1, idx).sign() / k)
        return d.reshape(g.shape)

    def project_ball(self, delta: Tensor, eps: float) -> Tensor:
        """Exact Euclidean projection onto the ℓ1 ball (Duchi et al., ICML 2008), O(D log D)."""
        flat = _flat(delta)
        a = flat.abs()
        inside = a.sum(dim=1) <= eps
        mu = a.sort(dim=1, descending=True).values  # (B, D)
        cumsum = mu.cumsum(dim=1)
        ks = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
        cond = mu - (cumsum - eps) / ks > 0
        rho = cond.to(flat.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True
        theta = (cumsum.gather(1, rho) - eps) / (rho + 1).to(flat.dtype)
        projected = flat.sign() * (a - theta).clamp_min(0)
        out = torch.where(inside.unsqueeze(1), flat, projected)
        return out.reshape(delta.shape)

    def random_ball(self, like: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
        # Uniform in the ℓ1 ball: D+1 exponentials normalised by their sum give a uniform
        # point of the simplex; drop the last coordinate and attach random signs.
        flat = _flat(like)
        b, d = flat.shape
        u = torch.rand(b, d + 1, generator=generator, device=like.device, dtype=like.dtype)
        e = -torch.log(u.clamp_min(1e-30))
        mag = e[:, :d] / e.sum(dim=1, keepdim=True)
        signs = torch.randint(0, 2, (b, d), generator=generator, device=like.device).to(like.dtype) * 2 - 1
        return (eps * mag * signs).reshape(like.shape)


NORMS: dict[str, LpNorm] = {"linf": Linf(), "l2": L2(), "l1": L1()}


def get_norm(name: str) -> LpNorm:
    """Look a norm up by name; a clear error for an unknown one."""
    try:
        return NORMS[name]
    except KeyError:
        raise ConfigError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}") from None


@dataclass(frozen=True)
class ThreatModel:
    """The set of allowed inputs ``{x + δ : ‖δ‖_p ≤ ε, lo ≤ x + δ ≤ hi}``.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: radius ε ≥ 0 in pixel units (inputs live in ``bounds``).
        bounds: the data domain, ``(0.0, 1.0)`` for images.
        sparsity: fraction of coordinates an iterative ℓ1 step moves (ignored by ℓ∞/ℓ2).

    Example:
        >>> tm = ThreatModel("linf", 8 / 255)
        >>> x_adv = tm.project(x + 0.1, x)  # back inside the ball and [0, 1]
    """

    norm: str
    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)
    sparsity: float = 0.01

    def __post_init__(self) -> None:
        get_norm(self.norm)
        eps = float(self.eps)
        if not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"eps must be a finite number >= 0, got {self.eps!r}")
        lo, hi = (float(b) for b in self.bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"bounds must be finite with lo < hi, got {self.bounds!r}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ConfigError(f"sparsity must be in [0, 1], got {self.sparsity!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", (lo, hi))

    @property
    def geometry(self) -> LpNorm:
        return NORMS[self.norm]

    def norm_of(self, delta: Tensor) -> Tensor:
        """‖δ‖_p per example, (B, ...) -> (B,)."""
        return self.geometry.norm(delta)

    def dual_norm(self, g: Tensor) -> Tensor:
        """‖g‖_q per example, (B, ...) -> (B,)."""
        return self.geometry.dual_norm(g)

    def ascent_direction(self, g: Tensor, *, iterative: bool = False) -> Tensor:
        """Unit-‖·‖_p direction d maximising ⟨d, g⟩ (= ‖g‖_q for the exact, non-iterative step)."""
        return self.geometry.ascent_direction(g, self.sparsity if iterative else 0.0)

    def clip(self, x_adv: Tensor) -> Tensor:
        """Clip to the data domain."""
        return x_adv.clamp(*self.bounds)

    def project(self, x_adv: Tensor, x: Tensor, radius: Tensor | None = None) -> Tensor:
        """Project onto ball ∩ box; x_adv, x (B, ...).

        Projects δ onto the ball, then clips to the box. Clipping only shrinks |δ_i| (x is
        inside the box), so the result stays inside the ball; for ℓ∞ it is the exact
        projection onto the intersection.

        ``radius`` (B,) gives each example its own radius instead of ε (the binary searches of
        :mod:`robustopt.evaluation.stability` need that). Projection onto a norm ball is
        positively homogeneous, ``P_{rB}(δ) = r·P_B(δ/r)``, so one geometry serves every radius.
        """
        if radius is None:
            return self.clip(x + self.geometry.project_ball(x_adv - x, self.eps))
        r = _per_example(radius.clamp_min(1e-12), x)
        delta = self.geometry.project_ball((x_adv - x) / r, 1.0) * r
        delta = torch.where(_per_example(radius > 0, x), delta, torch.zeros_like(delta))
        return self.clip(x + delta)

    def random_init(self, x: Tensor, generator: torch.Generator | None = None, radius: Tensor | None = None) -> Tensor:
        """A uniformly random point of the ball around x (radius ε, or ``radius`` (B,) per example), clipped to the box."""
        if radius is None:
            return self.clip(x + self.geometry.random_ball(x, self.eps, generator))
        return self.clip(x + self.geometry.random_ball(x, 1.0, generator) * _per_example(radius, x))

    def radii(self, x: Tensor, radius: Tensor | None = None) -> Tensor:
        """Per-example radii (B,): ``radius`` if given, else ε for every example."""
        if radius is None:
            return torch.full((x.shape[0],), self.eps, device=x.device, dtype=x.dtype)
        return radius.to(device=x.device, dtype=x.dtype).reshape(-1)

    def rounding(self, x: Tensor) -> float:
        """How far storing ``x + δ`` in x's dtype can move a point, in this norm: ``‖1‖_p · ε_mach · max(|lo|, |hi|)``.

        Each coordinate rounds by at most one unit in the last place, so an exact projection can
        land up to this far outside the ball: for ℓ1 on a float32 MNIST image 784 · 1.2e-7 ≈ 9e-5.
        """
        tiny = torch.finfo(x.dtype if x.is_floating_point() else torch.float32).eps
        return float(self.norm_of(torch.ones_like(x[:1], dtype=torch.float32))) * tiny * max(map(abs, self.bounds))

    def contains(self, x_adv: Tensor, x: Tensor, atol: float = 1e-5) -> Tensor:
        """Per-example bool: x_adv is in the ball (up to atol·max(1, ε) plus :meth:`rounding`) and in the box (up to atol)."""
        lo, hi = self.bounds
        in_box = _flat((x_adv >= lo - atol) & (x_adv <= hi + atol)).all(dim=1)
        in_ball = self.norm_of(x_adv - x) <= self.eps + atol * max(1.0, self.eps) + self.rounding(x)
        return in_box & in_ball

    def default_step_size(self, steps: int) -> float:
        """ε for a single step (the paper's closed form); 2.5·ε/steps for PGD (Madry et al.)."""
        return self.eps if steps <= 1 else 2.5 * self.eps / steps

    def check_fits(self, input_shape: tuple[int, ...]) -> None:
        """Refuse an ε larger than the diameter of the box, (hi - lo)·D^(1/p)."""
        d = math.prod(input_shape)
        diameter = (self.bounds[1] - self.bounds[0]) * d ** (1.0 / self.geometry.p)
        if self.eps > diameter:
            raise ConfigError(
                f"eps {self.eps:g} exceeds the largest possible {self.norm} distance in the data domain "
                f"({diameter:g} for {d} inputs in {self.bounds}); use a smaller eps or check --eps-units"
            )

    def with_eps(self, eps: float) -> ThreatModel:
        return ThreatModel(self.norm, eps, self.bounds, self.sparsity)
