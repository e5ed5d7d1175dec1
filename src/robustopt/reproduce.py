"""``robustopt reproduce``: the paper's experiments (Shaham et al., arXiv 1511.05432) in one call.

A :class:`Schedule` says what to train and how hard to evaluate; :func:`reproduce` trains every
net of the plan into ``DIR/runs/<net>`` (finished runs are reused, interrupted ones resumed),
evaluates each on the paper's protocol (:func:`evaluate_net`), caches each net's evaluation in
``DIR/eval/<net>.json`` and writes the report (:mod:`robustopt.report`) and plots (:mod:`robustopt.plots`).

Nets are named ``baseline`` (standard training) or ``<kind>-<norm>`` with kind ``goodfellow``
(α = 0.5 clean term), ``robust`` (Algorithm 1, first order) or ``pgd`` (multi-step inner max).
With several models (CIFAR-10) the names get the model as a prefix: ``resnet18/robust-l2``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustopt import __version__
from robustopt.config import TrainConfig, make_config, read_toml
from robustopt.data import STATS, Dataset, load_dataset, to_float
from robustopt.errors import ConfigError, RunDirError
from robustopt.runs import CONFIG, MODEL, SUMMARY, is_finished, load_model, read_json, write_json
from robustopt.threat import ThreatModel, get_norm

Log = Callable[[str], None]
KINDS = {"baseline": "standard", "goodfellow": "goodfellow", "robust": "robust", "pgd": "pgd"}


@dataclass
class Schedule:
    """What ``reproduce`` trains and how it evaluates. Radii are in ``eps_units`` (the paper's: standardised)."""

    dataset: str = "mnist"
    models: tuple[str, ...] = ("paper-mnist",)
    nets: tuple[str, ...] = ("baseline", "goodfellow-linf", "robust-linf", "robust-l2", "robust-l1", "pgd-linf")
    radii: dict[str, float] = field(default_factory=lambda: {"linf": 0.2, "l2": 2.0, "l1": 2.0})
    eps_units: str = "standardized"
    subset: int | None = None  # training images (None: all)
    epochs: int = 4
    pgd_epochs: int = 2  # PGD-AT costs ~(steps+1) standard epochs per epoch
    pgd_steps: int = 5
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_schedule: str = "constant"
    lr_step: int = 25
    seed: int = 1  # the authors' seed
    eval_n: int = 1000  # first N test images for every adversarial evaluation
    transfer_scales: tuple[float, ...] = (1.0, 2.0, 3.0)  # transfer sets at radius × scale
    attack_steps: int = 20  # white-box PGD
    attack_restarts: int = 1
    curve_norms: tuple[str, ...] = ("linf", "l2")
    curve_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
    curve_n: int = 500
    curve_steps: int = 10
    minimal_norms: tuple[str, ...] = ("l2",)
    minimal_n: int = 500
    deepfool_steps: int = 50
    sanity_n: int = 200  # images for the evaluator's sanity checks (on each net's own norm); 0: off
    sanity_nets: tuple[str, ...] | None = None  # nets that get them (None: every net)
    examples: int = 8  # images per row of the example grid
    eval_batch: int = 500

    def __post_init__(self) -> None:
        for name in ("epochs", "pgd_epochs", "pgd_steps", "eval_n", "curve_n", "minimal_n", "attack_steps", "eval_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"reproduce config: {name} must be a whole number >= 1, got {getattr(self, name)!r}")
        self.models, self.nets = tuple(self.models), tuple(self.nets)
        self.transfer_scales, self.curve_scales = tuple(self.transfer_scales), tuple(self.curve_scales)
        self.curve_norms, self.minimal_norms = tuple(self.curve_norms), tuple(self.minimal_norms)
        if not isinstance(self.sanity_n, int) or self.sanity_n < 0:
            raise ConfigError(f"reproduce config: sanity_n must be a whole number >= 0, got {self.sanity_n!r}")
        if self.sanity_nets is not None:
            self.sanity_nets = tuple(self.sanity_nets)
        if "baseline" not in self.nets:
            raise ConfigError("reproduce config: nets must include 'baseline' (the transfer sets are built on it)")
        for net in self.nets:
            kind, _, norm = net.partition("-")
            if kind not in KINDS or (kind == "baseline") != (norm == "") or (norm and norm not in self.radii):
                raise ConfigError(f"reproduce config: bad net {net!r}; use baseline or <goodfellow|robust|pgd>-<norm in radii>")
        for net in self.net_names():
            self.train_config(net)  # validates models, radii, optimiser

    def pixel_radius(self, norm: str) -> float:
        """The training radius of ``norm`` in pixel units (σ-scaled when given in standardised units)."""
        if self.eps_units == "pixel":
            return float(self.radii[norm])
        std = STATS[self.dataset][1]
        return float(self.radii[norm]) * sum(std) / len(std)

    def net_names(self) -> list[str]:
        if len(self.models) == 1:
            return list(self.nets)
        return [f"{m}/{n}" for m in self.models for n in self.nets]

    def train_config(self, name: str) -> TrainConfig:
        """The TrainConfig of net ``name`` (``[model/]kind[-norm]``)."""
        model, _, net = name.rpartition("/")
        kind, _, norm = net.partition("-")
        values: dict[str, Any] = dict(
            dataset=self.dataset,
            model=model or self.models[0],
            method=KINDS[kind],
            epochs=self.pgd_epochs if kind == "pgd" else self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.lr_schedule,
            lr_step=self.lr_step,
            subset=self.subset,
            seed=self.seed,
        )
        if kind != "baseline":
            values.update(norm=norm, eps=self.radii[norm], eps_units=self.eps_units)
        if kind == "pgd":
            values["steps"] = self.pgd_steps
        return make_config(values)

    def eval_keys(self) -> dict[str, Any]:
        """The settings an evaluation depends on (its cache key)."""
        skip = {"epochs", "pgd_epochs", "pgd_steps", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip | {"lr_step", "subset", "eval_batch"}}


# The built-in plans, as overrides of the Schedule defaults (the full MNIST plan is the defaults).
# fmt: off
PLANS: dict[tuple[str, bool], dict[str, Any]] = {
    ("mnist", False): {},
    ("mnist", True): dict(subset=12000, epochs=2, pgd_epochs=1, pgd_steps=3, eval_n=500, attack_steps=10, curve_n=200,
                          curve_steps=5, curve_scales=(1.0, 3.0, 8.0), minimal_n=100, sanity_n=50, deepfool_steps=30),
    # CIFAR-10: the paper's l2 radius 0.2 (standardised); the l-inf radius 0.03 (≈ 1.9/255 in pixels) is ours.
    ("cifar10", False): dict(nets=("baseline", "goodfellow-linf", "robust-l2", "robust-linf", "pgd-linf"), epochs=100,
                             pgd_epochs=50, pgd_steps=7),
    ("cifar10", True): dict(nets=("baseline", "robust-l2"), subset=2000, epochs=2, pgd_epochs=1, pgd_steps=3, eval_n=200,
                            attack_steps=5, curve_n=100, curve_steps=3, curve_scales=(1.0, 4.0, 16.0), minimal_n=50,
                            sanity_n=50, deepfool_steps=20, eval_batch=100),
}
CIFAR = dict(dataset="cifar10", models=("paper-cifar", "resnet18"), radii={"l2": 0.2, "linf": 0.03}, curve_norms=("l2", "linf"),
             lr=0.05, weight_decay=5e-4, batch_size=128, lr_schedule="step", lr_step=25)
# fmt: on


def default_schedule(dataset: str, quick: bool) -> Schedule:
    """The built-in plans: ``mnist`` (full or quick) and ``cifar10`` (quick: CPU-sized; full: GPU-sized)."""
    if (dataset, quick) not in PLANS:
        raise ConfigError(f"reproduce knows mnist and cifar10, not {dataset!r}")
    return Schedule(**(CIFAR if dataset == "cifar10" else {}), **PLANS[dataset, quick])


def load_schedule(dataset: str, quick: bool, config: Path | None = None) -> Schedule:
    """The default plan for ``dataset``, with a TOML file's keys (the Schedule's fields) applied on top."""
    schedule = default_schedule(dataset, quick)
    if config is None:
        return schedule
    allowed = {f.name for f in dataclasses.fields(Schedule)} - {"dataset"}
    values = read_toml(config, allowed)
    try:
        return dataclasses.replace(schedule, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config file {config}: {e}") from None


# ----------------------------------------------------------------------------- training


def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name.replace("/", "-")


def ensure_trained(cfg: TrainConfig, where: Path, *, data_dir: Path | None, device: str | None, progress: bool, log: Log) -> str:
    """Train ``cfg`` into ``where`` unless it is finished there; resume an unfinished run. Returns what happened."""
    from robustopt.train import train

    if is_finished(where):
        saved = read_json(where / CONFIG).get("train", {})
        diff = sorted(k for k, v in cfg.training_keys().items() if saved.get(k) != v)
        if diff:
            raise RunDirError(
                f"{where} was trained with a different schedule ({', '.join(diff)}); use another --out or delete it"
            )
        return "reused"
    resume = (where / CONFIG).exists()
    train(cfg, where, data_dir=data_dir, device=device, resume=resume, progress_bar=progress, log=log)
    return "resumed" if resume else "trained"


# ----------------------------------------------------------------------------- evaluation cache


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_key(schedule: Schedule, net_dir: Path, baseline_dir: Path) -> str:
    """Changes when the evaluation settings, the net's weights or the baseline's weights change."""
    blob = json.dumps(
        [schedule.eval_keys(), file_digest(net_dir / MODEL), file_digest(baseline_dir / MODEL), __version__],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_eval(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


# ----------------------------------------------------------------------------- the whole job


def provenance(device: torch.device) -> dict[str, Any]:
    import matplotlib
    import numpy

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_commit": commit,
        "versions": {
            "robustopt": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "matplotlib": matplotlib.__version__,
        },
    }


# ----------------------------------------------------------------------------- the paper's protocol


def _acc(model: nn.Module, x: Tensor, y: Tensor, attack: str, threat: ThreatModel, s: Schedule, **kw: Any) -> dict[str, Any]:
    """:func:`robustopt.evaluate.evaluate` with the schedule's batch size and seed; no sanity checks unless asked."""
    from robustopt.evaluate import evaluate

    kw = {"sanity": False, **kw}
    res = evaluate(model, x, y, attack, threat, batch_size=s.eval_batch, seed=s.seed, progress=False, **kw)
    res.pop("robust_mask")
    return res


def evaluate_net(
    model: nn.Module, source: nn.Module, x: Tensor, y: Tensor, s: Schedule, sanity_norm: str | None, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The whole protocol for one net (accuracies count an image only if correct on x and on x_adv):

    * ``transfer``: the paper's test sets, one fast-method step (``fgsm`` = ``perturb`` steps=1) against
      ``source`` (the baseline) per norm and radius × scale;
    * ``whitebox``: single-step and PGD against the net itself at the training radii, with the evaluator's
      sanity checks (:mod:`robustopt.sanity`) on ``sanity_norm``;
    * ``curves``: PGD accuracy against ε; ``minimal``: DeepFool minimal perturbations of the correctly
      classified images (:mod:`robustopt.stability`).

    Returns the JSON-able results and the example-grid images (PGD adversarials and predictions)."""
    from tqdm import tqdm

    from robustopt.attacks import run_attack
    from robustopt.stability import minimal_perturbations, summary

    t0 = time.monotonic()
    norms = list(s.radii)
    bar = tqdm(
        total=len(norms) * (len(s.transfer_scales) + 1) + len(s.curve_norms) + len(s.minimal_norms),
        desc="evaluate",
        leave=False,
        disable=not progress,
        unit="step",
    )
    res: dict[str, Any] = {"n": len(y), "transfer": {}, "whitebox": {}, "curves": {}, "minimal": {}, "sanity": {}}
    for norm in norms:
        for scale in s.transfer_scales:
            t = ThreatModel(norm, s.pixel_radius(norm) * scale)
            res["transfer"][f"{norm}@{scale:g}"] = _acc(model, x, y, "fgsm", t, s, source_model=source)["adversarial_accuracy"]
            bar.update(1)
        t = ThreatModel(norm, s.pixel_radius(norm))
        pgd = _acc(
            model,
            x,
            y,
            "pgd",
            t,
            s,
            steps=s.attack_steps,
            restarts=s.attack_restarts,
            sanity=norm == sanity_norm,
            sanity_n=min(s.sanity_n, len(y)),
        )
        fgsm = _acc(model, x, y, "fgsm", t, s)["adversarial_accuracy"]
        res["clean"] = pgd["clean_accuracy"]
        res["whitebox"][norm] = {"eps": t.eps, "fgsm": fgsm, "pgd": pgd["adversarial_accuracy"]}
        if "sanity" in pgd:
            res["sanity"] = {"norm": norm, "eps": t.eps, "checks": pgd["sanity"]}
        bar.update(1)
    xc, yc = x[: s.curve_n], y[: s.curve_n]
    for norm in s.curve_norms:
        curve = [
            _acc(model, xc, yc, "pgd", ThreatModel(norm, s.pixel_radius(norm) * k), s, steps=s.curve_steps)
            for k in s.curve_scales
        ]
        res["curves"][norm] = [[0.0, curve[0]["clean_accuracy"]]] + [[c["eps"], c["adversarial_accuracy"]] for c in curve]
        bar.update(1)
    xm, ym = x[: s.minimal_n], y[: s.minimal_n]
    with torch.no_grad():
        correct = model(xm).argmax(1) == ym
    for norm in s.minimal_norms:
        d = minimal_perturbations(
            model, xm[correct], ym[correct], norm, "deepfool", steps=s.deepfool_steps, batch_size=s.eval_batch
        )
        stats = summary(d, get_norm(norm).norm(xm[correct]).cpu())
        res["minimal"][norm] = {**stats, "dists": [float(v) if math.isfinite(v) else None for v in d.tolist()]}
        bar.update(1)
    bar.close()
    t = ThreatModel(norms[0], s.pixel_radius(norms[0]))
    xe, ye = x[: s.examples], y[: s.examples]
    x_adv = run_attack("pgd", model, xe, ye, t, steps=s.attack_steps, generator=torch.Generator(x.device).manual_seed(s.seed))
    with torch.no_grad():
        examples = {"x_adv": x_adv, "pred": model(x_adv).argmax(1), "eps": torch.tensor([t.eps])}
    res["eval_seconds"] = round(time.monotonic() - t0, 2)
    return res, examples


# ----------------------------------------------------------------------------- the whole job


def train_all(s: Schedule, out: Path, *, data_dir: Path | None, device: str | None, progress: bool, log: Log) -> dict[str, Any]:
    """Train or reuse every net; returns per net its method, radius, status and run summary."""
    info = {}
    names = s.net_names()
    for i, name in enumerate(names, 1):
        cfg, where = s.train_config(name), run_dir(out, name)
        radius = "" if cfg.method == "standard" else f" {cfg.norm} eps {cfg.pixel_eps:.4g} px"
        log(f"[{i}/{len(names)}] {name}: {cfg.method}{radius}, {cfg.epochs} epoch(s) -> {where}")
        status = ensure_trained(cfg, where, data_dir=data_dir, device=device, progress=progress, log=log)
        summary = read_json(where / SUMMARY)
        info[name] = {
            "status": status,
            "run_dir": str(where),
            "method": cfg.method,
            "model": cfg.model,
            "norm": None if cfg.method == "standard" else cfg.norm,
            "pixel_eps": None if cfg.method == "standard" else cfg.pixel_eps,
            "epochs": cfg.epochs,
            "inner_steps": cfg.inner_steps,
            "test_acc": summary.get("test_acc"),
            "train_seconds": summary.get("train_seconds"),
            "train_wall_seconds": summary.get("wall_seconds"),
        }
        log(f"    {status}: full test-set accuracy {summary.get('test_acc', float('nan')):.4f}")
    return info


def evaluate_all(s: Schedule, out: Path, data: Dataset, dev: torch.device, *, progress: bool, log: Log) -> dict[str, Any]:
    """Evaluate every net (from the cache in ``out/eval`` when nothing changed); one transfer source per model."""
    from robustopt.runs import save_tensors

    n = min(s.eval_n, len(data.y_test))
    x, y = to_float(data.x_test[:n]).to(dev), data.y_test[:n].to(dev)
    evals: dict[str, Any] = {}
    for model_name in s.models:
        prefix = "" if len(s.models) == 1 else f"{model_name}/"
        base_dir = run_dir(out, prefix + "baseline")
        source = None
        for net in s.nets:
            name = prefix + net
            where, cache = run_dir(out, name), out / "eval" / f"{name.replace('/', '-')}.json"
            key = eval_key(s, where, base_dir)
            hit = cached_eval(cache, key)
            if hit is not None:
                log(f"{name}: evaluation reused from {cache}")
                evals[name] = hit
                continue
            source = source or load_model(base_dir, dev)
            log(f"{name}: evaluating on {len(y)} test images (transfer sets built against {prefix}baseline)")
            checked = s.sanity_n > 0 and (s.sanity_nets is None or net in s.sanity_nets)
            sanity_norm = (net.partition("-")[2] or next(iter(s.radii))) if checked else None
            res, examples = evaluate_net(load_model(where, dev), source, x, y, s, sanity_norm, progress)
            evals[name] = {"key": key, **res}
            save_tensors(cache.with_suffix(".examples.safetensors"), examples)
            write_json(cache, evals[name])
            log(
                f"    done in {res['eval_seconds']:.0f}s: clean {res['clean']:.3f}, "
                + ", ".join(f"PGD-{n} {w['pgd']:.3f}" for n, w in res["whitebox"].items())
            )
    return evals


def reproduce(
    schedule: Schedule,
    out: Path,
    *,
    quick: bool = False,
    data_dir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Train (or reuse) every net of ``schedule`` in ``out/runs``, evaluate them all, write report.md, results.json
    and the PNGs into ``out``. Returns the results dict (as in results.json)."""
    from robustopt import plots, report
    from robustopt.train import pick_device

    t0 = time.monotonic()
    dev = pick_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(schedule.dataset, data_dir)
    train_info = train_all(schedule, out, data_dir=data_dir, device=device, progress=progress, log=log)
    t_train = time.monotonic() - t0
    evals = evaluate_all(schedule, out, data, dev, progress=progress, log=log)
    results = report.assemble(schedule, train_info, evals, quick=quick, provenance=provenance(dev), n_test=len(data.y_test))
    results["wall_seconds"] = {"train_phase": round(t_train, 1), "total": round(time.monotonic() - t0, 1)}
    results["plots"] = plots.make_plots(results, evals, out, data)
    results["wall_seconds"]["total"] = round(time.monotonic() - t0, 1)
    write_json(out / "results.json", report.strip_for_json(results))
    (out / "report.md").write_text(report.render(results))
    total = results["wall_seconds"]["total"]
    log(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(results['plots'])} plots in {total:.0f}s")
    return results
