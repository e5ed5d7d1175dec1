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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from robustopt.errors import ConfigError, DataError, RobustoptError
from robustopt.evaluation import sanity as sanity_checks
from robustopt.evaluation.attacks import check_attack, run_attack
from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.eot import ExpectedLogits
from robustopt.evaluation.sanity import FULL, CheckPlan, light_plan
from robustopt.runs import content_hash, read_json, unwrap, write_json
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import check_inputs, preserve_state

Tensor = torch.Tensor
AttackFn = Callable[[nn.Module, Tensor, Tensor, ThreatModel], Tensor]
Log = Callable[[str], None]
TOL = 1e-5
GRADIENT_FREE = {"square", "auto", "autoattack"}  # attacks with a black-box part
CASCADES = ("auto", "autoattack")  # report robust counts per component
DEFAULT_STEPS = {"pgd": 40, "bim": 40, "apgd-ce": 100}


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
    """(name, fn(model, x, y, threat, generator, **extra) -> x_adv) for a registered name or a callable."""
    if callable(attack):
        return getattr(attack, "__name__", "custom"), lambda m, x, y, t, g, **_: attack(m, x, y, t)
    name = check_attack(attack)
    return name, lambda m, x, y, t, g, **extra: run_attack(
        name, m, x, y, t, steps=steps, restarts=restarts, generator=g, **attack_kwargs, **extra
    )


def _weights_hash(model: nn.Module | None) -> str | None:
    """sha256 of a model's weights and buffers: a partial file belongs to exactly these weights."""
    return None if model is None else content_hash(unwrap(model).state_dict())


def _load_partial(path: Path | None, key: dict[str, Any]) -> tuple[list[bool], list[bool], dict[str, int]]:
    """Clean and robust flags (and cascade counts) of the examples already done by an earlier run with the same key."""
    if path is None or not Path(path).is_file():
        return [], [], {}
    saved = read_json(Path(path))
    if not isinstance(saved, dict) or saved.get("key") != key:
        return [], [], {}
    return list(saved["clean"]), list(saved["robust"]), dict(saved.get("components") or {})


def check_model(model: nn.Module, x: Tensor, y: Tensor, what: str = "model", num_classes: int | None = None) -> None:
    """Refuse a model that rejects the inputs or returns the wrong number of classes, before any attack runs."""
    try:
        with torch.no_grad(), preserve_state(model):
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward pass on these inputs is a data/model mismatch
        why = (str(e).splitlines() or [""])[0]
        raise DataError(
            f"{what} rejected inputs of shape {tuple(x.shape[1:])} ({type(e).__name__}: {why}); "
            "check that the data set matches the model"
        ) from e
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(f"{what} returned {got} for {x.shape[0]} inputs; it must return logits of shape (B, num_classes)")
    need = num_classes if num_classes is not None else int(y.max()) + 1
    if out.shape[1] != need if num_classes is not None else out.shape[1] < need:
        raise DataError(f"{what} returns {out.shape[1]} classes but the data has {need}; use a model built for this data set")


def _batch_masks(model, attacker, fn, xb, yb, threat, name, gen, extra) -> tuple[Tensor, Tensor]:
    clean = predict(model, xb) == yb
    x_adv = enforce(threat, fn(attacker, xb, yb, threat, gen, **extra), xb, name)
    return clean, clean & (predict(model, x_adv) == yb)


def _sanity_mode(sanity: bool | str) -> str:
    mode = {True: "light", False: "off"}.get(sanity, sanity) if isinstance(sanity, bool) else sanity
    if mode not in ("light", "full", "off"):
        raise ConfigError(f"sanity must be True, False, 'light', 'full' or 'off', got {sanity!r}")
    return mode


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
    sanity: bool | str = True,
    sanity_n: int | None = None,
    sanity_options: dict[str, Any] | None = None,
    attack_kwargs: dict[str, Any] | None = None,
    num_classes: int | None = None,
    eot_samples: int = 20,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Evaluate ``model`` on (x (N, C, H, W) in the box, y (N,)) under ``attack`` within ``threat``.

    ``attack`` is a name of :data:`robustopt.evaluation.attacks.ATTACKS` or a callable
    ``(model, x, y, threat) -> x_adv``. ``device`` defaults to the model's; if given, the
    model(s) are moved there. ``sanity``: True or "light" (checks costing about a quarter of
    the attack), "full" (the heavy version, ``sanity_n`` examples, default 200) or False.
    ``sanity_options`` go to :func:`robustopt.evaluation.sanity.run_checks` (steps, queries, tol, ...).
    A randomised model (two forward passes disagree) is attacked with EOT over ``eot_samples``.
    Returns a dict with clean_accuracy, adversarial_accuracy, attack, norm, eps, n, steps,
    restarts, seed, transfer, seconds, seconds_attack, sanity, components (auto, autoattack)
    and robust_mask (a bool tensor (N,), not JSON: drop it before serialising).
    """
    t0 = time.time()
    check_inputs(x, y, threat, where="evaluate")
    check_batch(batch_size, restarts, steps)
    threat.check_fits(tuple(x.shape[1:]))
    mode = _sanity_mode(sanity)
    dev = torch.device(device) if device is not None else next(iter(model.parameters()), torch.empty(0)).device
    model = model.to(dev)
    source_model = source_model.to(dev) if source_model is not None else None
    attacker, outputs = _checked_attacker(model, source_model, x, y, dev, num_classes, eot_samples, log)
    name, fn = _attack_fn(attack, steps, restarts, attack_kwargs or {})
    key = {"attack": name, "norm": threat.norm, "eps": threat.eps, "steps": steps, "restarts": restarts}
    key.update(seed=seed, n=len(y), batch_size=batch_size, transfer=source_model is not None, eot=attacker is not model)
    key.update(attack_kwargs={k: repr(v) for k, v in sorted((attack_kwargs or {}).items())})  # survives a JSON round trip
    partial = Path(partial_path) if partial_path else None
    if partial is not None:  # partial results belong to these weights and this data only
        key.update(model_sha256=_weights_hash(model), source_sha256=_weights_hash(source_model))
        key.update(data_sha256=content_hash({"x": x, "y": y}))
    clean, robust, stats = _load_partial(partial, key)
    clean, robust = _attack_batches(model, attacker, fn, x, y, threat, name, key, partial, (clean, robust, stats), dev, progress)
    robust_mask = torch.tensor(robust, dtype=torch.bool)
    result: dict[str, Any] = {k: v for k, v in key.items() if k != "attack_kwargs"}
    result.update(clean_accuracy=sum(clean) / len(y), adversarial_accuracy=sum(robust) / len(y))
    if name in CASCADES:
        result["components"] = dict(stats)
    result["seconds_attack"] = time.time() - t0
    if mode != "off":
        t1 = time.time()
        cost = sanity_checks.attack_cost(name, steps, restarts, len(y), stats if name in CASCADES else None)
        reuse = (steps or DEFAULT_STEPS[name]) if name in sanity_checks.REUSABLE and source_model is None else None
        plan = _plan(mode, cost, len(y), reuse, sanity_n, sanity_options or {})
        result["sanity"] = {**outputs, **_sanity(model, x, y, threat, robust_mask, source_model is not None,
                            name not in GRADIENT_FREE, plan, seed, dev, log, sanity_options or {})}  # fmt: skip
        result["sanity_plan"] = {**asdict(plan), "mode": mode, "cost": plan.cost(), "attack_cost": cost}
        result["seconds_sanity"] = time.time() - t1
    result["seconds"] = time.time() - t0
    result["robust_mask"] = robust_mask
    return result


def _checked_attacker(
    model: nn.Module,
    source_model: nn.Module | None,
    x: Tensor,
    y: Tensor,
    dev: torch.device,
    num_classes: int | None,
    eot_samples: int,
    log: Log,
) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Check the model(s) on a probe batch and return the module to attack and the output checks.

    The attacker is the source model for a transfer evaluation, wrapped in EOT (expected logits
    over ``eot_samples`` passes) when two forward passes of the model disagree.
    """
    probe_x, probe_y = x[:32].to(dev), y[:32].to(dev)
    check_model(model, probe_x, probe_y, "the model", num_classes)
    if source_model is not None:
        check_model(source_model, probe_x, probe_y, "the source model", num_classes)
    outputs = sanity_checks.output_checks(model, probe_x)
    sanity_checks.report_failures(outputs, log)
    attacker = model if source_model is None else source_model
    if not outputs["randomness"]["passed"]:
        attacker = ExpectedLogits(attacker, eot_samples)
    return attacker, outputs


def _attack_batches(
    model: nn.Module,
    attacker: nn.Module,
    fn: AttackFn,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    name: str,
    key: dict[str, Any],
    partial: Path | None,
    done: tuple[list[bool], list[bool], dict[str, int]],
    dev: torch.device,
    progress: bool,
) -> tuple[list[bool], list[bool]]:
    """Per-example clean and robust flags, batch by batch from where ``done`` stops, saved to ``partial`` as it goes."""
    clean, robust, stats = done
    batch_size, seed = key["batch_size"], key["seed"]
    extra = {"stats": stats} if name in CASCADES else {}
    desc = f"{name} {threat.norm} eps={threat.eps:g}"
    with tqdm(total=len(y), initial=len(clean), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(len(clean), len(y), batch_size):
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + start)
            xb, yb = x[start : start + batch_size].to(dev), y[start : start + batch_size].to(dev)
            c, r = _batch_masks(model, attacker, fn, xb, yb, threat, name, gen, extra)
            clean, robust = clean + c.tolist(), robust + r.tolist()
            if partial is not None:
                write_json(partial, {"key": key, "clean": clean, "robust": robust, "components": stats})
            bar.update(len(yb))
    return clean, robust


def check_batch(batch_size: int, restarts: int, steps: int | None) -> None:
    """Budgets must be positive integers."""
    for flag, v in (("batch_size", batch_size), ("restarts", restarts), ("steps", steps)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"evaluate: {flag} must be an integer >= 1, got {v!r}")


def _plan(mode: str, cost: float, n: int, reuse: int | None, sanity_n: int | None, options: dict[str, Any]) -> CheckPlan:
    """The checks' budget: today's heavy plan for "full", else a quarter of the attack's cost."""
    if mode == "full":
        steps, queries = options.get("steps", 20), options.get("queries", 1000)
        return CheckPlan(min(n, sanity_n or FULL.n), steps, 2 * steps, 2, steps, queries)
    plan = light_plan(cost, n, reuse)
    return replace(plan, n=min(plan.n, sanity_n)) if sanity_n else plan


def _sanity(model, x, y, threat, robust_mask, transfer, whitebox_only, plan, seed, dev, log, options) -> dict[str, Any]:
    """Run the sanity checks on the first ``plan.n`` examples and print failures loudly.

    The evaluated attack's mask joins the white-box side of the white-box ≤ black-box check
    only when it uses no black-box part (``auto`` contains Square itself).
    """
    n = plan.n
    mask = robust_mask[:n].to(dev)
    options = {k: v for k, v in options.items() if k not in ("steps", "queries")}
    checks = sanity_checks.run_checks(
        model,
        x[:n].to(dev),
        y[:n].to(dev),
        threat,
        evaluated=None if transfer or not whitebox_only else mask,
        transfer=mask if transfer else None,
        generator=torch.Generator(device=dev).manual_seed(seed + 7),
        plan=plan,
        **options,
    )
    sanity_checks.report_failures(checks, log)
    return checks
