"""Automatic checks that an evaluation can be trusted (signs of gradient masking).

A model that *masks* its gradients (zero, noisy or useless input gradients) defeats
gradient attacks without being robust (Athalye et al. 2018; Tramèr et al. 2018). Each
check below compares attacks that must be ordered if gradients are informative; a
violation is recorded as ``{"passed": False, ...}`` and printed loudly with what to do next
(:data:`ADVICE`). All accuracies are robust accuracies on the same examples: correct on x
*and* on x_adv.

Before any attack (:func:`output_checks`, three forward passes on 32 images):

* ``randomness``: two forward passes on the same inputs must agree; if not, the evaluator
  attacks the expected logits (EOT, :mod:`robustopt.evaluation.eot`);
* ``logits``: outputs that are all ≥ 0 with rows summing to 1 are probabilities, not logits.

After the attack (:func:`run_checks`, on the first ``plan.n`` examples):

* ``large_eps``: PGD over the whole box (every input reachable: the ball of the box's diameter, in any
  norm, holds it; searched in ℓ∞ with ε = hi − lo) must leave accuracy ~0 (≤ ``large_eps_max``);
* ``more_steps``: PGD with 2× the steps must not be more than ``tol`` above the PGD run;
* ``iterative_vs_single``: PGD must not be more than ``tol`` above the single-step attack;
* ``whitebox_vs_blackbox``: the white-box accuracy (PGD, and the evaluated attack when it
  is white-box) must not be more than ``tol`` above the black-box Square attack's;
* ``whitebox_vs_transfer``: likewise against the transfer accuracy (only with a source model);
* ``zero_gradients``: at most ``tol`` of the examples may have an exactly zero input gradient
  (AutoAttack's ``checks.py`` idea).

Budgets (:class:`CheckPlan`): the default "light" plan costs at most a quarter of the
evaluated attack (:func:`light_plan`, :func:`attack_cost`): when the evaluated attack is PGD,
BIM or APGD-CE its own robust mask is the PGD run, the stronger run has 2× its steps, the
large-ε PGD 5 steps, Square 100 queries, and the sample is as large as the budget allows
(16 to 200 examples). :data:`FULL` is the heavy version: 200 examples, PGD-20, PGD-40 with 2
restarts, Square with 1000 queries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robustopt.evaluation.attacks import pgd, square
from robustopt.evaluation.attacks._common import predict
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import frozen_parameters, input_gradient, preserve_state

Tensor = torch.Tensor
Log = Callable[[str], None]


def robust_accuracy(model: nn.Module, x_adv: Tensor, y: Tensor, clean: Tensor) -> tuple[float, Tensor]:
    """(accuracy, mask (B,)): correct on x and on x_adv."""
    mask = clean & (predict(model, x_adv) == y)
    return float(mask.float().mean()), mask


def diameter(threat: ThreatModel, x: Tensor) -> float:
    """The largest distance in the box in the threat's norm, (hi − lo)·D^(1/p)."""
    lo, hi = threat.bounds
    return float(threat.norm_of(torch.full_like(x[:1], hi - lo)))


def _check(passed: bool, message: str, **details: Any) -> dict[str, Any]:
    return {"passed": bool(passed), "message": message, **details}


ALPHA = 0.01  # a check fails only when chance alone would produce what it saw less often than this


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), exactly (n is at most a few thousand here)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def paired_worse(worse: Tensor, better: Tensor) -> dict[str, Any]:
    """Is the attack that should be stronger (robust mask ``better``) really worse than the other (``worse``)?

    On the same examples, only the discordant pairs carry information: b examples the stronger attack
    left robust but the weaker broke, c the other way round. With no real difference b ~ Binomial(b + c, ½),
    so the check fails when b > c and P(X ≥ b) < :data:`ALPHA` (McNemar's exact one-sided test). The
    tolerance on the accuracy difference thereby shrinks like 1/√n: one image in 16 is noise, 30 of 1000 are not.
    """
    b = int((better & ~worse).sum())
    c = int((worse & ~better).sum())
    p = binomial_tail(b, b + c, 0.5) if b > c else 1.0
    return {"passed": p >= ALPHA, "discordant": [b, c], "p_value": p}


def count_above(k: int, n: int, rate: float) -> dict[str, Any]:
    """Is a count k of n significantly above the allowed ``rate``? (exact one-sided binomial test at :data:`ALPHA`)."""
    p = binomial_tail(k, n, rate) if k > rate * n else 1.0
    return {"passed": p >= ALPHA, "p_value": p}


def _gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ cross-entropy at the clean points: shared by the single-step attack and the zero-gradient check."""
    with preserve_state(model), frozen_parameters(model):
        return input_gradient(model, x, y)[0]


def _zero_gradients(grad: Tensor, tol: float) -> dict[str, Any]:
    zero = int((grad.flatten(1).abs().amax(1) == 0).sum())
    test = count_above(zero, len(grad), tol)
    return _check(test["passed"], "share of examples with an exactly zero input gradient", zero_fraction=zero / len(grad),
                  p_value=test["p_value"])  # fmt: skip


@dataclass(frozen=True)
class CheckPlan:
    """What the gradient-masking checks run, on the first ``n`` examples of an evaluation.

    ``steps`` is the PGD run the other checks compare against (0: reuse the evaluated attack's
    own robust mask, which then *is* that run); ``more_steps × more_restarts`` the stronger PGD;
    ``large_eps_steps`` the PGD at the box's diameter; ``queries`` the Square attack's budget.
    """

    n: int
    steps: int = 20
    more_steps: int = 40
    more_restarts: int = 2
    large_eps_steps: int = 20
    queries: int = 1000

    def cost(self) -> float:
        """Upper bound on the work, in input-gradient evaluations (one forward pass counts 1/3)."""
        return self.n * (1 + self.steps + self.more_steps * self.more_restarts + self.large_eps_steps + self.queries / 3)


FULL = CheckPlan(n=200)  # the heavy version (`--sanity full`)
LIGHT_SHARE, LIGHT_MIN_N, LIGHT_MAX_N = 0.25, 16, 200
REUSABLE = {"pgd", "bim", "apgd-ce"}  # white-box gradient attacks whose robust mask is a PGD-like run


def light_plan(attack_cost: float, n_eval: int, reuse_steps: int | None) -> CheckPlan:
    """Checks costing at most ``LIGHT_SHARE`` of the evaluated attack (``attack_cost`` gradient evaluations).

    With ``reuse_steps`` (the evaluated attack is iterative white-box with that many steps) its
    mask is the PGD run and only the 2×-steps run is new; otherwise a PGD-10 is run. The sample
    is as large as the budget allows, between ``LIGHT_MIN_N`` (never fewer, even over budget)
    and ``LIGHT_MAX_N``, and never more than the evaluation itself.
    """
    base = CheckPlan(n=1, steps=0 if reuse_steps else 10, more_steps=2 * (reuse_steps or 10), more_restarts=1,
                     large_eps_steps=10, queries=100)  # fmt: skip
    n = int(LIGHT_SHARE * attack_cost // base.cost())
    n = min(n_eval, max(LIGHT_MIN_N, min(n, LIGHT_MAX_N)))
    return CheckPlan(n, base.steps, base.more_steps, 1, base.large_eps_steps, base.queries)


def attack_cost(name: str, steps: int | None, restarts: int, n: int, stats: dict[str, int] | None = None) -> float:
    """A lower bound on the work of an evaluated attack on ``n`` examples, in input-gradient evaluations.

    ``stats`` (robust counts after each component of auto/autoattack) makes the cascades'
    figure exact up to their early exits: each component is charged only for the examples that
    reached it.
    """
    per = {"fgsm": 1, "fgm": 1, "pgd": (steps or 40) * restarts, "bim": steps or 40, "apgd-ce": (steps or 100) * restarts,
           "apgd-dlr": steps or 100, "deepfool": 3, "cw": steps or 100, "lbfgs": steps or 100,
           "square": 1 + (steps or 5000) / 3 / 50, "fab-t": steps or 100}  # fmt: skip
    # square and fab-t stop early on broken points: charged as if the average point took 1/50 of the queries / one target
    if stats and name in ("auto", "autoattack"):
        s = steps or 100
        unit = {"apgd-ce": s * restarts, "apgd-t": 9 * s, "fab-t": 9 * s, "square": 5000 / 3}
        reached, total = stats.get("clean", n), 0.0
        for comp, left in stats.items():
            if comp in unit:
                total += reached * unit[comp] if comp == "apgd-ce" else left * unit[comp]  # survivors ran every target
                reached = left
        return max(total, float(n))
    return float(per.get(name, 10 * n if name in ("auto", "autoattack") else 10) * n)


def run_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    evaluated: Tensor | None = None,
    transfer: Tensor | None = None,
    steps: int = 20,
    queries: int = 1000,
    tol: float = 0.02,
    large_eps_max: float = 0.02,
    generator: torch.Generator | None = None,
    plan: CheckPlan | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every check on (x (B, ...), y (B,)).

    ``evaluated`` is the white-box robust mask (B,) of the evaluated attack (None for a
    transfer evaluation); ``transfer`` the transfer robust mask (B,) when there is one. Without
    ``plan`` the checks use PGD-``steps`` and Square with ``queries`` (the full version); a plan
    with ``steps=0`` takes ``evaluated`` as the PGD run. Comparisons of two attacks are paired tests
    on the same examples (:func:`paired_worse`), rates are exact binomial tests (:func:`count_above`),
    so their tolerance shrinks with n; ``tol`` and ``large_eps_max`` are the rates allowed.
    Returns ``{check_name: {"passed": bool, "message": str, ...accuracies}}``.
    """
    plan = plan or CheckPlan(len(y), steps, 2 * steps, 2, steps, queries)
    m = _masks(model, x, y, threat, evaluated, plan, generator)
    white = m["fewer"] & m["more"] if evaluated is None else m["fewer"] & m["more"] & evaluated
    acc = {k: float(v.float().mean()) for k, v in m.items() if isinstance(v, Tensor) and v.dtype == torch.bool}
    more_name = f"PGD-{plan.more_steps}" + (f"x{plan.more_restarts}" if plan.more_restarts > 1 else "")
    large = count_above(int(m["large"].sum()), len(y), large_eps_max)
    checks = {
        "large_eps": _check(large["passed"], "PGD accuracy with every input reachable", eps=m["big_eps"],
                            accuracy=acc["large"], p_value=large["p_value"]),
        "more_steps": _pair(f"{more_name} vs {m['fewer_name']}", m["more"], m["fewer"], more=acc["more"], fewer=acc["fewer"]),
        "iterative_vs_single": _pair("PGD vs single-step accuracy", m["more"], m["single"], iterative=acc["more"],
                                     single_step=acc["single"]),
        "whitebox_vs_blackbox": _pair("white-box vs Square accuracy", white, m["black"], whitebox=float(white.float().mean()),
                                      blackbox=acc["black"]),
        "zero_gradients": _zero_gradients(m["grad"], tol),
    }  # fmt: skip
    if transfer is not None:
        checks["whitebox_vs_transfer"] = _pair(
            "white-box vs transfer accuracy",
            white,
            transfer,
            whitebox=float(white.float().mean()),
            transfer=float(transfer.float().mean()),
        )
    for c in checks.values():
        c["tolerance"] = tol
        c["n"] = len(y)
    return checks


def _pair(message: str, should_be_lower: Tensor, other: Tensor, **accuracies: float) -> dict[str, Any]:
    test = paired_worse(other, should_be_lower)
    return _check(test["passed"], message, **accuracies, discordant=test["discordant"], p_value=test["p_value"])


def _masks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    evaluated: Tensor | None,
    plan: CheckPlan,
    generator: torch.Generator | None,
) -> dict[str, Any]:
    """The robust masks (B,) the checks compare: single step, PGD (fewer / more steps), PGD at the box's
    diameter, Square; plus the clean input gradient."""
    clean = predict(model, x) == y
    grad = _gradient(model, x, y)
    out: dict[str, Any] = {"grad": grad}
    out["single"] = robust_accuracy(model, threat.project(x + threat.eps * threat.ascent_direction(grad), x), y, clean)[1]
    if plan.steps == 0 and evaluated is not None:
        out["fewer"], out["fewer_name"] = evaluated & clean, "the evaluated attack"
    else:
        x_pgd = pgd(model, x, y, threat, steps=plan.steps, generator=generator)
        out["fewer"], out["fewer_name"] = robust_accuracy(model, x_pgd, y, clean)[1], f"PGD-{plan.steps}"
    more = pgd(model, x, y, threat, steps=plan.more_steps, restarts=plan.more_restarts, generator=generator)
    out["more"] = robust_accuracy(model, more, y, clean)[1]
    # A ball of the box's diameter, in any norm, holds the whole box, so the inputs reachable are the box itself: PGD
    # searches it in ℓ∞ with ε = hi − lo whatever the evaluated norm. (An ℓ1 path of the same length moves a few
    # coordinates per step and kept returning to the saturated ones: a plain 20-feature net failed the check.)
    # Step (hi − lo)/steps: a path of one diameter, enough to reach any input. PGD's default 2.5·ε/steps
    # jumps between the box's corners at this ε: with 5 steps of 0.5 it left 4.5% of a robust MNIST
    # net's 200 images correct; with 5 steps of 0.2, or 10 of 0.1, none (no masking, a weak check).
    lo, hi = threat.bounds
    big = ThreatModel("linf", hi - lo, bounds=threat.bounds)
    x_large = pgd(model, x, y, big, steps=plan.large_eps_steps, step_size=big.eps / plan.large_eps_steps, generator=generator)
    out["large"], out["big_eps"] = robust_accuracy(model, x_large, y, clean)[1], diameter(threat, x)
    out["black"] = robust_accuracy(model, square(model, x, y, threat, steps=plan.queries, generator=generator), y, clean)[1]
    return out


def _fmt(key: str, value: Any) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"{key}={value}"


ADVICE = {
    "large_eps": "PGD fails even where every input is reachable: gradients are masked or broken; evaluate with "
    "--attack autoattack (its Square part needs no gradients) and look for non-differentiable steps in the model",
    "more_steps": "more PGD steps did worse: the gradients are noisy; evaluate with --attack autoattack or more --restarts",
    "iterative_vs_single": "PGD did worse than one step: the loss surface is masked; evaluate with --attack autoattack",
    "whitebox_vs_blackbox": "the gradient-free Square attack beat the gradient attacks: gradients are masked; report "
    "--attack autoattack (or square) instead of this figure",
    "whitebox_vs_transfer": "examples built on another model beat the white-box attack: gradients are masked; "
    "report the transfer figure or --attack autoattack",
    "zero_gradients": "many inputs have an exactly zero gradient (rounding, argmax or a saturated softmax inside the "
    "model): gradient attacks are blind there; use --attack autoattack, whose DLR loss and Square do not need them",
    "randomness": "the model is randomised (dropout left on? call model.eval()); it was attacked with EOT, averaging "
    "its logits over several passes; for a published figure use an adaptive attack (Athalye et al. 2018)",
    "finite": "the model returns NaN or infinite outputs: no accuracy or attack on it means anything; check its "
    "weights (a diverged run?) and its input range ([0, 1] expected), then evaluate again",
    "logits": "the model returns probabilities, not logits (rows are >= 0 and sum to 1): cross-entropy on them "
    "saturates and masks gradients; drop the final softmax so the model returns logits, and evaluate again",
}


@torch.no_grad()
def output_checks(model: nn.Module, x: Tensor, atol: float = 1e-5) -> dict[str, dict[str, Any]]:
    """Two cheap checks on the raw outputs, run before any attack (AutoAttack's ``checks.py`` ideas).

    * ``randomness``: two forward passes on the same inputs x (B, ...) must agree up to ``atol``;
    * ``logits``: rows that are all ≥ 0 and sum to 1 are probabilities, not logits;
    * ``finite``: NaN or infinite outputs fail outright.
    """
    with preserve_state(model):
        a, b = model(x).float(), model(x).float()
    raw = a
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    a, b = torch.nan_to_num(a), torch.nan_to_num(b)
    diff = float((a - b).abs().max())
    probs = bool((a >= 0).all()) and bool(((a.sum(1) - 1).abs() <= 1e-4).all())
    return {
        "finite": _check(finite, "every output is a finite number", nonfinite=0 if finite else int((~torch.isfinite(raw)).sum())),
        "randomness": _check(diff <= atol * max(1.0, float(a.abs().max())), "two forward passes agree", max_difference=diff),
        "logits": _check(
            not probs, "outputs are logits, not probabilities", row_sum_min=float(a.sum(1).min()), min_output=float(a.min())
        ),
    }


def advice(name: str, style: str = "python") -> str:
    """What to do after check ``name`` failed, naming the CLI's flags (``style="cli"``) or the Python API's arguments."""
    text = ADVICE.get(name, "do not trust this robustness figure until a stronger attack agrees")
    if style == "cli":
        return text
    text = re.sub(r"--attack ([\w-]+)", r"evaluate(..., attack='\1')", text)
    return text.replace("more --restarts", "more restarts=")


def report_failures(checks: dict[str, dict[str, Any]], log: Log, style: str = "python") -> None:
    """Print each failed check loudly, with what to do next (in the words of the CLI or of the Python API)."""
    for name, c in checks.items():
        if not c["passed"]:
            nums = ", ".join(_fmt(k, v) for k, v in c.items() if k not in ("passed", "message", "advice"))
            log(f"!!! SANITY CHECK FAILED: {name} ({c['message']}: {nums})")
            log(f"!!! what to do: {advice(name, style)}")
