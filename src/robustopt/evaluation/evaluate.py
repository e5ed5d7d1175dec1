"""The evaluator: runs an attack under the rules, keeps the per-example worst case, checks itself.

Rules it enforces on every attack's output (foolbox's idea: an attack cannot cheat):

* the result is clipped to the data domain;
* ``‖x_adv − x‖ ≤ ε + tol`` and ``x_adv ∈ [lo, hi]`` are asserted per example
  (:class:`ThreatViolation` otherwise);
* an example counts as robust only if it is classified correctly on x *and* on x_adv (x is
  itself in the threat model): the worst case per example.

Protocols: white-box (attack the evaluated model) and, with ``source_model``, the paper's
transfer protocol (adversarial examples built once on a source model, e.g. the baseline,
and evaluated on the target). Long evaluations can save partial results after every batch
to ``partial_path`` (JSON) and continue from there. Randomness is seeded per batch from
``seed``, so a continued run gives the same numbers as an uninterrupted one.

Example:
    >>> res = evaluate(model, x, y, "pgd", ThreatModel("linf", 0.3), steps=40, restarts=2)
    >>> res["clean_accuracy"], res["adversarial_accuracy"], res["sanity"]["large_eps"]["passed"]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from robustopt.errors import RobustoptError
from robustopt.evaluation import sanity as sanity_checks
from robustopt.evaluation.attacks import check_attack, run_attack
from robustopt.evaluation.attacks._common import predict
from robustopt.runs import write_json
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor
AttackFn = Callable[[nn.Module, Tensor, Tensor, ThreatModel], Tensor]
Log = Callable[[str], None]
TOL = 1e-5
GRADIENT_FREE = {"square", "auto"}  # attacks with a black-box part


class ThreatViolation(RobustoptError):
    """An attack returned a point outside the threat model."""

    exit_code = 1


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def enforce(threat: ThreatModel, x_adv: Tensor, x: Tensor, name: str) -> Tensor:
    """Clip x_adv to the box and assert every example lies in the ball (up to TOL)."""
    x_adv = threat.clip(x_adv.detach())
    ok = threat.contains(x_adv, x, atol=TOL)
    if not bool(ok.all()):
        worst = float(threat.norm_of(x_adv - x).max())
        raise ThreatViolation(
            f"attack {name} returned {int((~ok).sum())} points outside the {threat.norm} ball of radius {threat.eps:g} "
            f"(largest norm {worst:.6g}); this is a bug in the attack"
        )
    return x_adv


def _attack_fn(attack: str | AttackFn, steps: int | None, restarts: int, attack_kwargs: dict[str, Any]) -> tuple[str, Callable]:
    """(name, fn(model, x, y, threat, generator) -> x_adv) for a registered name or a callable."""
    if callable(attack):
        return getattr(attack, "__name__", "custom"), lambda m, x, y, t, g: attack(m, x, y, t)
    name = check_attack(attack)
    return name, lambda m, x, y, t, g: run_attack(name, m, x, y, t, steps=steps, restarts=restarts, generator=g, **attack_kwargs)


def _load_partial(path: Path | None, key: dict[str, Any]) -> tuple[list[bool], list[bool]]:
    """Clean and robust flags of the examples already done by an earlier run with the same settings."""
    if path is None or not Path(path).is_file():
        return [], []
    from robustopt.runs import read_json

    saved = read_json(Path(path))
    if saved.get("key") != key:
        return [], []
    return list(saved["clean"]), list(saved["robust"])


def _batch_masks(model, attacker, fn, xb, yb, threat, name, gen) -> tuple[Tensor, Tensor]:
    clean = predict(model, xb) == yb
    x_adv = enforce(threat, fn(attacker, xb, yb, threat, gen), xb, name)
    return clean, clean & (predict(model, x_adv) == yb)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | AttackFn,
    threat: ThreatModel,
    *,
    steps: int | None = None,
    restarts: int = 1,
    batch_size: int = 500,
    source_model: nn.Module | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    partial_path: str | Path | None = None,
    sanity: bool = True,
    sanity_n: int = 200,
    sanity_options: dict[str, Any] | None = None,
    attack_kwargs: dict[str, Any] | None = None,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Evaluate ``model`` on (x (N, C, H, W) in the box, y (N,)) under ``attack`` within ``threat``.

    ``sanity_options`` go to :func:`robustopt.evaluation.sanity.run_checks` (steps, queries, tol, ...).
    ``attack`` is a name of :data:`robustopt.evaluation.attacks.ATTACKS` or a callable
    ``(model, x, y, threat) -> x_adv``. ``device`` defaults to the model's; if given, the
    model(s) are moved there. Returns a dict with clean_accuracy, adversarial_accuracy,
    attack, norm, eps, n, steps, restarts, seed, transfer, seconds, sanity and robust_mask
    (a bool tensor (N,), not JSON: drop it before serialising).
    """
    t0 = time.time()
    threat.check_fits(tuple(x.shape[1:]))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev)
    attacker = model if source_model is None else source_model.to(dev)
    name, fn = _attack_fn(attack, steps, restarts, attack_kwargs or {})
    key = {"attack": name, "norm": threat.norm, "eps": threat.eps, "steps": steps, "restarts": restarts}
    key.update(seed=seed, n=len(y), batch_size=batch_size, transfer=source_model is not None)
    partial = Path(partial_path) if partial_path else None
    clean, robust = _load_partial(partial, key)
    desc = f"{name} {threat.norm} eps={threat.eps:g}"
    with tqdm(total=len(y), initial=len(clean), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(len(clean), len(y), batch_size):
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + start)
            xb, yb = x[start : start + batch_size].to(dev), y[start : start + batch_size].to(dev)
            c, r = _batch_masks(model, attacker, fn, xb, yb, threat, name, gen)
            clean, robust = clean + c.tolist(), robust + r.tolist()
            if partial is not None:
                write_json(partial, {"key": key, "clean": clean, "robust": robust})
            bar.update(len(yb))
    robust_mask = torch.tensor(robust, dtype=torch.bool)
    result: dict[str, Any] = dict(key, clean_accuracy=sum(clean) / len(y), adversarial_accuracy=sum(robust) / len(y))
    if sanity:
        whitebox_only = name not in GRADIENT_FREE
        result["sanity"] = _sanity(
            model,
            x,
            y,
            threat,
            robust_mask,
            source_model is not None,
            whitebox_only,
            sanity_n,
            seed,
            dev,
            log,
            sanity_options or {},
        )
    result["seconds"] = time.time() - t0
    result["robust_mask"] = robust_mask
    return result


def _sanity(model, x, y, threat, robust_mask, transfer, whitebox_only, n, seed, dev, log, options) -> dict[str, dict[str, Any]]:
    """Run the sanity checks on the first ``n`` examples and print failures loudly.

    The evaluated attack's mask joins the white-box side of the white-box ≤ black-box check
    only when it uses no black-box part (``auto`` contains Square itself).
    """
    n = min(n, len(y))
    mask = robust_mask[:n].to(dev)
    checks = sanity_checks.run_checks(
        model,
        x[:n].to(dev),
        y[:n].to(dev),
        threat,
        evaluated=None if transfer or not whitebox_only else mask,
        transfer=mask if transfer else None,
        generator=torch.Generator(device=dev).manual_seed(seed + 7),
        **options,
    )
    sanity_checks.report_failures(checks, log)
    return checks
