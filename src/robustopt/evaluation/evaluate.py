"""The evaluator: runs an attack under the rules, keeps the per-example worst case, checks itself.

Rules it enforces on every attack's output (foolbox's idea: an attack cannot cheat):

* the result is clipped to the data domain;
* ``‖x_adv − x‖ ≤ ε + tol`` and ``x_adv ∈ [lo, hi]`` are asserted per example
  (:class:`ThreatViolation` otherwise; tol allows one rounding step of a float16/bfloat16 input);
* an example counts as robust only if it is classified correctly on x *and* on x_adv (x is
  itself in the threat model): the worst case per example.

Protocols: white-box (attack the evaluated model) and, with ``source_model``, the paper's
transfer protocol (adversarial examples built once on a source model, e.g. the baseline,
and evaluated on the target). Long evaluations can save partial results after every batch
to ``partial_path`` (JSON, :mod:`robustopt.evaluation.partial`) and continue from there.
Randomness is seeded per batch from ``seed``, so a continued run gives the same numbers as an
uninterrupted one.

Example:
    >>> res = evaluate(model, x, y, ThreatModel("linf", 0.3), "pgd", steps=40, restarts=2)
    >>> res.clean_accuracy, res.adversarial_accuracy, res.sanity["large_eps"]["passed"]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from robustopt.errors import ConfigError, DataError, RobustoptError
from robustopt.evaluation import sanity as sanity_checks
from robustopt.evaluation.attacks import attack_options, check_attack, run_attack
from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.attacks._registry import accepts_any, name_of, options_of
from robustopt.evaluation.eot import ExpectedLogits
from robustopt.evaluation.partial import check_partial_path, load_partial, save_partial
from robustopt.evaluation.sanity import FULL, CheckPlan, light_plan
from robustopt.tensors import content_hash, unwrap
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import check_inputs, preserve_state

Tensor = torch.Tensor
AttackFn = Callable[..., Tensor]
Log = Callable[[str], None]
TOL = 1e-5
GRADIENT_FREE = {"square", "auto", "autoattack"}  # attacks with a black-box part
CASCADES = ("auto", "autoattack")  # report robust counts per component
DEFAULT_STEPS = {"pgd": 40, "bim": 40, "apgd-ce": 100}


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured. ``to_dict()`` is its JSON form (without the per-example mask)."""

    clean_accuracy: float
    adversarial_accuracy: float  # robust accuracy: correct on x and on x_adv
    attack: str
    norm: str
    eps: float
    n: int
    steps: int | None
    restarts: int
    seed: int
    transfer: bool
    eot: bool  # the model was randomised and attacked through expected logits
    seconds: float
    seconds_attack: float
    robust_mask: Tensor = field(repr=False)  # (N,) bool: robust examples
    components: dict[str, int] | None = None  # robust counts after each part of auto / autoattack
    sanity: dict[str, dict[str, Any]] | None = None
    sanity_plan: dict[str, Any] | None = None
    seconds_sanity: float | None = None
    key: dict[str, Any] = field(default_factory=dict, repr=False)  # what identifies this evaluation (partial files)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("robust_mask", "key")}
        return {k: v for k, v in out.items() if v is not None or k == "steps"}


class ThreatViolation(RobustoptError):
    """An attack returned a point outside the threat model."""

    exit_code = 1


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def enforce(threat: ThreatModel, x_adv: Tensor, x: Tensor, name: str) -> Tensor:
    """Clip x_adv to the box and assert every example lies in the ball, up to TOL (or, for a float16 or
    bfloat16 input, one rounding step per coordinate: such a point was rounded, not moved by the attack)."""
    x_adv = threat.clip(x_adv.detach())
    atol = TOL
    if x.dtype in (torch.float16, torch.bfloat16):
        atol = max(TOL, torch.finfo(x.dtype).eps * float(threat.norm_of(torch.ones_like(x[:1]).float())))
    ok = threat.contains(x_adv.float(), x.float(), atol=atol)
    if not bool(ok.all()):
        worst = float(threat.norm_of(x_adv.float() - x.float()).max())
        raise ThreatViolation(
            f"attack {name} returned {int((~ok).sum())} points outside the {threat.norm} ball of radius {threat.eps:g} "
            f"(largest norm {worst:.6g}); this is a bug in the attack"
        )
    return x_adv


def _weights_hash(model: nn.Module | None) -> str | None:
    """sha256 of a model's weights and buffers: a partial file belongs to exactly these weights."""
    return None if model is None else content_hash(unwrap(model).state_dict())


def check_model(model: nn.Module, x: Tensor, y: Tensor, what: str = "model", num_classes: int | None = None) -> None:
    """Refuse a model that rejects the inputs or returns the wrong number of classes, before any attack runs."""
    if not isinstance(model, nn.Module) and not callable(model):
        raise ConfigError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
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


def _sanity_mode(sanity: bool | str) -> str:
    mode = {True: "light", False: "off"}.get(sanity, sanity) if isinstance(sanity, bool) else sanity
    if mode not in ("light", "full", "off"):
        raise ConfigError(f"sanity must be True, False, 'light', 'full' or 'off', got {sanity!r}")
    return mode


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attack: str | AttackFn = "pgd",
    *,
    steps: int | None = None,
    restarts: int = 1,
    options: dict[str, Any] | None = None,
    batch_size: int = 500,
    source_model: nn.Module | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool | None = None,
    partial_path: str | Path | None = None,
    sanity: bool | str = True,
    sanity_n: int | None = None,
    sanity_options: dict[str, Any] | None = None,
    num_classes: int | None = None,
    eot_samples: int = 20,
    log: Log | None = None,
    advice: str = "python",
) -> EvalResult:
    """Robust accuracy of ``model`` on (x (N, ...) in the box, y (N,)) under ``attack`` within ``threat``.

    ``attack`` is a registered name (:data:`robustopt.evaluation.attacks.ATTACKS`) or a function
    following the attack protocol ``(model, x, y, threat, **options) -> x_adv``; ``steps`` and
    ``restarts`` are its budget where it has them, ``options`` its other keyword options (checked
    against its signature). ``device`` defaults to the model's. ``sanity``: True or "light" (checks
    costing about a quarter of the attack), "full" (``sanity_n`` examples, default 200) or False;
    ``sanity_options`` go to :func:`robustopt.evaluation.sanity.run_checks`. A randomised model (two
    forward passes disagree) is attacked with EOT over ``eot_samples``. ``progress``: a bar (default:
    only on a terminal); ``log``: where warnings go (default stderr); ``advice``: "python" or "cli", the
    words failed checks use. Works inside ``torch.no_grad()``; ``torch.inference_mode()`` is refused.
    """
    t0 = time.time()
    _check_call(model, x, y, threat, batch_size, restarts, steps, seed)
    mode = _sanity_mode(sanity)
    log = log or _stderr
    dev = torch.device(device) if device is not None else next(iter(model.parameters()), torch.empty(0)).device
    model = model.to(dev)
    source_model = source_model.to(dev) if source_model is not None else None
    attacker, outputs = _checked_attacker(model, source_model, x, y, dev, num_classes, eot_samples, log, advice)
    name, run = _attack_fn(attack, steps, restarts, options or {})
    key = _key(name, threat, steps, restarts, seed, x, y, batch_size, source_model, attacker is not model, options or {})
    partial = _partial(Path(partial_path) if partial_path else None, key, model, source_model, x, y)
    clean, robust, stats = load_partial(partial, key)
    show = sys.stderr.isatty() if progress is None else progress
    clean, robust = _attack_batches(model, attacker, run, x, y, threat, name, key, partial, (clean, robust, stats), dev, show)
    result = EvalResult(
        clean_accuracy=sum(clean) / len(y), adversarial_accuracy=sum(robust) / len(y), attack=name, norm=threat.norm,
        eps=threat.eps, n=len(y), steps=steps, restarts=restarts, seed=seed, transfer=source_model is not None,
        eot=attacker is not model and source_model is None, seconds=0.0, seconds_attack=time.time() - t0,
        robust_mask=torch.tensor(robust, dtype=torch.bool), components=dict(stats) if name in CASCADES else None, key=key,
    )  # fmt: skip
    if mode != "off":
        result = _with_sanity(result, model, x, y, threat, outputs, mode, sanity_n, sanity_options or {}, dev, log, advice)
    return replace(result, seconds=time.time() - t0)


def _check_call(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, batch_size: int, restarts: int,
                steps: int | None, seed: int) -> None:  # fmt: skip
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"evaluate: seed must be a whole number in 0 .. 2**31 - 1, got {seed!r}")
    if torch.is_inference_mode_enabled():
        raise ConfigError("evaluate cannot attack inside torch.inference_mode() (no gradients exist there); call it outside, "
                          "torch.no_grad() is fine")  # fmt: skip
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(x, y, threat, where="evaluate")
    check_attack_budget(batch_size, restarts, steps)
    threat.check_fits(tuple(x.shape[1:]))
    if len(y) == 0:
        raise DataError("evaluate: no examples to evaluate (x and y are empty)")


def _key(name, threat, steps, restarts, seed, x, y, batch_size, source_model, eot, options) -> dict[str, Any]:
    """What identifies an evaluation: a partial file continues only the same one."""
    key = {"attack": name, "norm": threat.norm, "eps": threat.eps, "steps": steps, "restarts": restarts}
    key.update(seed=seed, n=len(y), batch_size=batch_size, transfer=source_model is not None, eot=eot)
    key.update(attack_kwargs={k: repr(v) for k, v in sorted(options.items())})  # survives a JSON round trip
    return key


def _partial(partial: Path | None, key: dict[str, Any], model, source_model, x: Tensor, y: Tensor) -> Path | None:
    """Partial results belong to these weights and this data only: their hashes join the key, and a file that is
    not this evaluation's is refused before any attack runs."""
    if partial is not None:
        key.update(model_sha256=_weights_hash(model), source_sha256=_weights_hash(source_model))
        key.update(data_sha256=content_hash({"x": x, "y": y}))
        check_partial_path(partial, key)
    return partial


def _with_sanity(result: EvalResult, model, x, y, threat, outputs, mode, sanity_n, options, dev, log, advice) -> EvalResult:
    """The result with its sanity checks: sized to a quarter of the attack ("light") or the heavy plan ("full")."""
    t1 = time.time()
    name, stats, transfer = result.attack, result.components, result.transfer
    cost = sanity_checks.attack_cost(name, result.steps, result.restarts, result.n, stats)
    reuse = (result.steps or DEFAULT_STEPS[name]) if name in sanity_checks.REUSABLE and not transfer else None
    plan = _plan(mode, cost, result.n, reuse, sanity_n, options)
    checks = _sanity(model, x, y, threat, result.robust_mask, transfer, name not in GRADIENT_FREE, plan, result.seed,
                     dev, log, options, advice)  # fmt: skip
    return replace(result, sanity={**outputs, **checks}, seconds_sanity=time.time() - t1,
                   sanity_plan={**asdict(plan), "mode": mode, "cost": plan.cost(), "attack_cost": cost})  # fmt: skip


def _attack_fn(attack: str | AttackFn, steps: int | None, restarts: int, options: dict[str, Any]) -> tuple[str, Callable]:
    """(name, run(model, x, y, threat, generator, **extra) -> x_adv) for a registered name or a protocol function."""
    if isinstance(attack, str):
        name = check_attack(attack)
    elif callable(attack):
        name = name_of(attack)
    else:
        raise ConfigError(f"attack must be a registered name or a function, got {type(attack).__name__}")
    budget = {k: v for k, v in (("steps", steps), ("restarts", restarts if restarts != 1 else None)) if v is not None}
    takes = _options(attack)
    for k in budget:
        if k not in takes and not (callable(attack) and accepts_any(attack)):
            raise ConfigError(f"attack {name} takes no {k} (its options: {', '.join(takes) or 'none'}); leave {k} unset")

    def run(m: nn.Module, x: Tensor, y: Tensor, t: ThreatModel, g: torch.Generator, **extra: Any) -> Tensor:
        return run_attack(m, x, y, t, attack, **budget, **_with_generator(attack, g), **options, **extra)

    return name, run


def _options(attack: str | AttackFn) -> dict[str, Any]:
    return dict(attack_options(attack) if isinstance(attack, str) else options_of(attack))


def _with_generator(attack: str | AttackFn, g: torch.Generator) -> dict[str, Any]:
    return {"generator": g} if "generator" in _options(attack) else {}


def _checked_attacker(
    model: nn.Module,
    source_model: nn.Module | None,
    x: Tensor,
    y: Tensor,
    dev: torch.device,
    num_classes: int | None,
    eot_samples: int,
    log: Log,
    advice: str = "python",
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
    sanity_checks.report_failures(outputs, log, advice)
    attacker = model if source_model is None else source_model
    if not outputs["randomness"]["passed"]:
        attacker = ExpectedLogits(attacker, eot_samples)
    return attacker, outputs


def _batch_masks(model, attacker, fn, xb, yb, threat, name, gen, extra) -> tuple[Tensor, Tensor]:
    clean = predict(model, xb) == yb
    x_adv = enforce(threat, fn(attacker, xb, yb, threat, gen, **extra), xb, name)
    return clean, clean & (predict(model, x_adv) == yb)


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
                save_partial(partial, key, clean, robust, stats)
            bar.update(len(yb))
    return clean, robust


def check_attack_budget(batch_size: int, restarts: int, steps: int | None) -> None:
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


def _sanity(model, x, y, threat, robust_mask, transfer, whitebox_only, plan, seed, dev, log, options, advice) -> dict[str, Any]:
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
    sanity_checks.report_failures(checks, log, advice)
    return checks
