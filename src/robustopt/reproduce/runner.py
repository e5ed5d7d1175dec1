"""``robustopt reproduce``: the paper's experiments (Shaham et al., arXiv 1511.05432) in one call.

A :class:`Schedule` says what to train and how hard to evaluate; :func:`reproduce` trains every
net of the plan into ``DIR/runs/<net>`` (finished runs are reused, interrupted ones resumed),
evaluates each on the paper's protocol (:func:`robustopt.reproduce.protocol.evaluate_net`), caches each net's evaluation in
``DIR/eval/<net>.json`` and writes the report (:mod:`robustopt.reproduce.report`) and plots (:mod:`robustopt.reproduce.plots`).

The plans and net names are in :mod:`robustopt.reproduce.schedule`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from robustopt.data.datasets import Dataset, load_dataset, to_float
from robustopt.errors import RunDirError
from robustopt.files import read_json, write_json
from robustopt.loading import load_model
from robustopt.reproduce.protocol import evaluate_net
from robustopt.reproduce.schedule import Schedule, default_schedule, load_schedule
from robustopt.rundir import CONFIG, MODEL, SUMMARY, is_finished
from robustopt.training.config import TrainConfig
from robustopt.version import __version__

__all__ = ["Schedule", "default_schedule", "load_schedule", "reproduce", "run_dir"]

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- training


def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name.replace("/", "-")


def _as_recorded(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg``'s training keys as a run records them: the threat in pixels; augmentation only when it was asked for."""
    keys = {**cfg.training_keys(), "norm": cfg.threat_norm, "eps": cfg.pixel_eps, "eps_units": "pixel"}
    if cfg.augment is None:
        keys.pop("augment")
    return keys


def ensure_trained(cfg: TrainConfig, where: Path, *, data_dir: Path | None, device: str | None, progress: bool, log: Log) -> str:
    """Train ``cfg`` into ``where`` unless it is finished there; resume an unfinished run. Returns what happened."""
    from robustopt.training.named import train

    if is_finished(where):
        saved = read_json(where / CONFIG).get("train", {})
        diff = sorted(k for k, v in _as_recorded(cfg).items() if saved.get(k) != v)
        if diff:
            raise RunDirError(
                f"{where} was trained with a different schedule ({', '.join(diff)}); use another --out or delete it"
            )
        return "reused"
    resume = (where / CONFIG).exists()
    try:
        train(cfg, where, data_dir=data_dir, device=device, resume=resume, progress=progress, log=log)
    except RunDirError as e:  # train's advice names its own flags (--overwrite); reproduce has none of them
        raise RunDirError(f"{where} holds a run reproduce cannot continue ({e}); delete {where} or use another --out") from None
    return "resumed" if resume else "trained"


# ----------------------------------------------------------------------------- evaluation cache


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PROTOCOL = 3  # bump when evaluate_net's output changes shape (2: examples on each net's own norm, a larger pool; 3: IBP verified)


def eval_key(schedule: Schedule, net_dir: Path, baseline_dir: Path) -> str:
    """Changes when the evaluation settings, the net's weights or the baseline's weights change."""
    blob = json.dumps(
        [schedule.eval_keys(), file_digest(net_dir / MODEL), file_digest(baseline_dir / MODEL), __version__, PROTOCOL],
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


# ----------------------------------------------------------------------------- provenance


def invocation_history(previous: Path, results: dict[str, Any], fresh_evals: list[str]) -> list[dict[str, Any]]:
    """The wall times of every invocation into this directory, oldest first, this one appended.

    A rerun that reuses everything must not hide what the first, training, invocation cost."""
    try:
        old = json.loads(previous.read_text()) if previous.is_file() else {}
    except (OSError, ValueError):
        old = {}  # a damaged results.json is rewritten below; its history is lost, nothing else
    history = old.get("invocations") if isinstance(old, dict) else None
    history = [r for r in history if isinstance(r, dict)] if isinstance(history, list) else []
    runs = [r for net in results["nets"].values() for r in net["runs"]]
    trained = [Path(r["run_dir"]).name for r in runs if r["status"] in ("trained", "resumed")]
    return [*history, {**results["wall_seconds"], "trained": trained, "evaluated": list(fresh_evals)}]


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


# ----------------------------------------------------------------------------- the whole job


def replica_suffixes(schedule: Schedule) -> list[tuple[Schedule, str]]:
    """Each seed's single-seed schedule and the suffix of its run and cache names (none for the first seed,
    so a ``--seeds 3`` run reuses the nets of an earlier single-seed run in the same directory)."""
    return [(r, "" if i == 0 else f"-seed{r.seed}") for i, r in enumerate(schedule.replicas())]


def train_all(
    s: Schedule, out: Path, *, data_dir: Path | None, device: str | None, progress: bool, log: Log, suffix: str = ""
) -> dict[str, Any]:
    """Train or reuse every net (run dirs ``runs/<net><suffix>``); returns per net its method, radius, status and summary."""
    info = {}
    names = s.net_names()
    for i, name in enumerate(names, 1):
        cfg, where = s.train_config(name), run_dir(out, name + suffix)
        radius = "" if cfg.method == "standard" else f" {cfg.threat_norm} eps {cfg.pixel_eps:.4g} px"
        log(f"[{i}/{len(names)}] {name}: {cfg.method}{radius}, {cfg.epochs} epoch(s), seed {cfg.seed} -> {where}")
        status = ensure_trained(cfg, where, data_dir=data_dir, device=device, progress=progress, log=log)
        summary = read_json(where / SUMMARY)
        info[name] = {
            "status": status,
            "seed": cfg.seed,
            "run_dir": str(where),
            "method": cfg.method,
            "model": cfg.model,
            "norm": None if cfg.method == "standard" else cfg.threat_norm,
            "pixel_eps": None if cfg.method == "standard" else cfg.pixel_eps,
            "epochs": cfg.epochs,
            "inner_steps": cfg.inner_steps,
            "test_acc": summary.get("test_acc"),
            "train_seconds": summary.get("train_seconds"),
            "train_wall_seconds": summary.get("wall_seconds"),
        }
        log(f"    {status}: test-set accuracy {summary.get('test_acc', float('nan')):.4f}")
    return info


def evaluate_all(
    s: Schedule,
    out: Path,
    data: Dataset,
    dev: torch.device,
    *,
    progress: bool,
    log: Log,
    fresh: list[str] | None = None,
    suffix: str = "",
) -> dict[str, Any]:
    """Evaluate every net (from the cache in ``out/eval`` when nothing changed); one transfer source per model and seed.

    The names of the nets evaluated now (not taken from the cache) are appended to ``fresh``."""
    from robustopt.tensors import save_tensors

    n = min(s.eval_n, len(data.y_test))
    x, y = to_float(data.x_test[:n]).to(dev), data.y_test[:n].to(dev)
    evals: dict[str, Any] = {}
    for model_name in s.models:
        prefix = "" if len(s.models) == 1 else f"{model_name}/"
        base_dir = run_dir(out, prefix + "baseline" + suffix)
        source = None
        for net in s.nets:
            name = prefix + net
            where, cache = run_dir(out, name + suffix), out / "eval" / f"{(name + suffix).replace('/', '-')}.json"
            key = eval_key(s, where, base_dir)
            hit = cached_eval(cache, key)
            if hit is not None:
                log(f"{name}: evaluation reused from {cache}")
                evals[name] = hit
                continue
            source = source or load_model(base_dir, dev)
            log(f"{name}{suffix}: evaluating on {len(y)} test images (transfer sets built against {prefix}baseline{suffix})")
            checked = s.sanity_n > 0 and (s.sanity_nets is None or net in s.sanity_nets)
            own_norm = net.partition("-")[2] or next(iter(s.radii))  # the baseline: the first radius
            sanity_norm = own_norm if checked else None
            res, (examples, about) = evaluate_net(load_model(where, dev), source, x, y, s, sanity_norm, progress, own_norm)
            evals[name] = {"key": key, **res}
            if fresh is not None:
                fresh.append(name + suffix)
            save_tensors(cache.with_suffix(".examples.safetensors"), examples, about)
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
    plan: str = "full",
    data_dir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Train (or reuse) every net of ``schedule`` in ``out/runs``, once per seed, evaluate them all, write report.md,
    results.json and the PNGs into ``out``. Returns the results dict (as in results.json): each figure is the mean over
    the seeds, with its std under ``nets[name]["std"]`` when there are several."""
    from robustopt.devices import pick_device
    from robustopt.reproduce import plots, report

    t0 = time.monotonic()
    dev = pick_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(schedule.dataset, data_dir)
    replicas = replica_suffixes(schedule)
    trained = [train_all(r, out, data_dir=data_dir, device=device, progress=progress, log=log, suffix=x) for r, x in replicas]
    t_train = time.monotonic() - t0
    fresh_evals: list[str] = []
    evals = [evaluate_all(r, out, data, dev, progress=progress, log=log, fresh=fresh_evals, suffix=x) for r, x in replicas]
    results = report.assemble(
        schedule,
        [(r.seed, info, ev) for (r, _), info, ev in zip(replicas, trained, evals, strict=True)],
        plan=plan,
        provenance=provenance(dev),
        n_test=min(schedule.test_n or len(data.y_test), len(data.y_test)),
        n_test_total=len(data.y_test),
    )
    results["wall_seconds"] = {"train_phase": round(t_train, 1), "total": round(time.monotonic() - t0, 1)}
    results["plots"] = plots.make_plots(results, out, data)
    results["wall_seconds"]["total"] = round(time.monotonic() - t0, 1)
    results["invocations"] = invocation_history(out / "results.json", results, fresh_evals)
    write_json(out / "results.json", report.strip_for_json(results))
    (out / "report.md").write_text(report.render(results))
    total = results["wall_seconds"]["total"]
    log(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(results['plots'])} plots in {total:.0f}s")
    return results
