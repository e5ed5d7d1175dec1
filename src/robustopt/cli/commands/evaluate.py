"""``robustopt evaluate`` and ``robustopt stability``: flags mapped onto :mod:`robustopt.evaluation.evaluate`
and :mod:`robustopt.evaluation.stability`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def _load(run_dir: Path, device: str | None, subset: int | None, data_dir: Path | None):
    """(model, x float (N, C, H, W), y (N,), device, config) for a run's first ``subset`` test images."""
    from robustopt.data.datasets import load_dataset, to_float
    from robustopt.devices import pick_device
    from robustopt.errors import ConfigError, RunDirError
    from robustopt.runs import CONFIG, load_model, read_json

    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the --out directory of a finished training run")
    if subset is not None and subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {subset}")
    dev = pick_device(device)
    cfg = read_json(Path(run_dir) / CONFIG)
    model = load_model(run_dir, dev)
    data = load_dataset(cfg.get("dataset", "mnist"), data_dir)
    n = len(data.y_test) if subset is None else min(subset, len(data.y_test))
    return model, to_float(data.x_test[:n]), data.y_test[:n], dev, cfg


def _threat(norm: str, eps: str):
    from robustopt.threat.model import ThreatModel
    from robustopt.training.config import parse_number

    return ThreatModel(norm, parse_number(eps, "--eps"))


def _print_human(res: dict[str, Any]) -> None:
    typer.echo(f"clean accuracy        {res['clean_accuracy']:.4f}  (n={res['n']})")
    what = "transfer" if res["transfer"] else "white-box"
    typer.echo(f"{res['attack']} {res['norm']} eps={res['eps']:g} ({what})  {res['adversarial_accuracy']:.4f}")
    for name, c in res.get("sanity", {}).items():
        typer.echo(f"sanity {name:22s} {'passed' if c['passed'] else 'FAILED'}")
    typer.echo(f"time {res['seconds']:.1f} s")


def evaluate_command(
    run_dir: Path = typer.Argument(..., help="A finished training run directory."),
    attack: str = typer.Option("pgd", help="fgsm | fgm | pgd | bim | lbfgs | deepfool | cw | auto | apgd-ce | apgd-dlr | square"),
    norm: str = typer.Option("linf", help="linf | l2 | l1"),
    eps: str = typer.Option(..., help="Radius ε in pixel units, e.g. 0.3 or 8/255."),
    steps: int | None = typer.Option(None, help="Attack iterations (queries for square)  [default: per attack]"),
    restarts: int = typer.Option(1, help="Random restarts (pgd, apgd-ce, auto)."),
    subset: int | None = typer.Option(None, help="Evaluate the first N test images."),
    batch_size: int = typer.Option(500, help="Examples per attack batch."),
    source: Path | None = typer.Option(None, "--source", help="Build the examples on this run's model (transfer)."),
    targets: int | None = typer.Option(None, help="auto/apgd-dlr: target classes for targeted APGD  [default: 9]"),
    queries: int | None = typer.Option(None, help="auto: Square attack queries  [default: 5000]"),
    partial: Path | None = typer.Option(None, "--partial", help="Save partial results here and continue from them."),
    sanity: bool = typer.Option(True, "--sanity/--no-sanity", help="Run the gradient-masking sanity checks."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    seed: int = typer.Option(0, help="Seeds random starts and the Square attack."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Attack a trained model and report clean and adversarial accuracy, with sanity checks."""
    from robustopt.errors import ConfigError
    from robustopt.evaluation.attacks import check_attack
    from robustopt.evaluation.evaluate import evaluate

    check_attack(attack)
    threat = _threat(norm, eps)
    if restarts < 1 or (steps is not None and steps < 1) or batch_size < 1:
        raise ConfigError("--steps, --restarts and --batch-size must be >= 1")
    model, x, y, dev, _ = _load(run_dir, device, subset, data_dir)
    src = None if source is None else _load(source, str(dev), 1, data_dir)[0]
    extra = {k: v for k, v in (("n_targets", targets), ("queries", queries)) if v is not None}
    if extra and attack not in ("auto", "apgd-dlr"):
        raise ConfigError("--targets and --queries apply to --attack auto (and --targets to apgd-dlr)")
    if attack == "apgd-dlr":
        extra.pop("queries", None)
    res = evaluate(model, x, y, attack, threat, steps=steps, restarts=restarts, batch_size=batch_size, source_model=src,
                   seed=seed, progress=progress, partial_path=partial, sanity=sanity, attack_kwargs=extra)  # fmt: skip
    res.pop("robust_mask")
    res.update(run_dir=str(run_dir), source=None if source is None else str(source))
    if as_json:
        typer.echo(json.dumps(res, sort_keys=True))
    else:
        _print_human(res)


def stability_command(
    run_dir: Path = typer.Argument(..., help="A finished training run directory."),
    norm: str = typer.Option("l2", help="linf | l2 | l1"),
    method: str = typer.Option("deepfool", help="deepfool | pgd (binary search over ε)"),
    subset: int | None = typer.Option(1000, help="Use the first N test images."),
    compare: list[Path] = typer.Option([], "--compare", help="Other run directories to measure and overlay."),
    out: Path | None = typer.Option(None, "--out", help="Histogram PNG  [default: RUN_DIR/stability_<norm>_<method>.png]"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Minimal adversarial perturbation statistics (median, mean, ρ_adv) and a histogram PNG."""
    from robustopt.evaluation.stability import METHODS, minimal_perturbations, plot_histogram, summary
    from robustopt.threat.model import get_norm

    geom = get_norm(norm)
    if method not in METHODS:
        from robustopt.errors import ConfigError

        raise ConfigError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    dists, stats = {}, {}
    for rd in [run_dir, *compare]:
        model, x, y, _, _ = _load(rd, device, subset, data_dir)
        d = minimal_perturbations(model, x, y, norm, method, progress=progress)
        dists[str(rd)], stats[str(rd)] = d, summary(d, geom.norm(x))
    png = plot_histogram(
        dists, out or Path(run_dir) / f"stability_{norm}_{method}.png", xlabel=f"minimal {norm} perturbation ({method})"
    )
    if as_json:
        typer.echo(json.dumps({"norm": norm, "method": method, "runs": stats, "histogram": str(png)}, sort_keys=True))
        return
    for rd, s in stats.items():
        line = f"found={s['found_fraction']:.3f} median={s['median']:.4g} mean={s['mean']:.4g} rho_adv={s['rho_adv']:.4g}"
        typer.echo(f"{rd}: n={s['n']} {line}")
    typer.echo(f"histogram {png}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
    app.command("stability")(stability_command)
