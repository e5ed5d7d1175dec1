"""``robustopt certify``: flags mapped onto :func:`robustopt.certify.certify`.

Verified accuracy is a guaranteed lower bound on robust accuracy (every attack gives an upper bound).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def _load(run: str, device: str | None, subset: int | None, data_dir: Path | None, trust_code: bool):
    """(model, x (N, ...) in [0, 1], y (N,), data set name) for a run directory or ``pretrained:NAME``."""
    from robustopt import load_model
    from robustopt.data.datasets import load_dataset, to_float
    from robustopt.devices import pick_device
    from robustopt.errors import ConfigError, RunDirError
    from robustopt.pretrained import resolve_run

    if subset is not None and subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {subset}")
    d = resolve_run(run)
    if not Path(d).is_dir():
        raise RunDirError(f"run directory {d} does not exist; pass the --out directory of a finished training run")
    try:
        cfg = json.loads((Path(d) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise RunDirError(f"{d} has no readable config.json; pass the --out directory of a finished training run") from None
    dev = pick_device(device)
    model = load_model(d, dev, trust_code=trust_code)
    if not isinstance(cfg, dict):
        raise RunDirError(f"{d / 'config.json'} is not a robustopt run configuration")
    data = load_dataset(_data_source(cfg), data_dir)
    name = str(cfg.get("dataset", "mnist"))
    n = len(data.y_test) if subset is None else min(subset, len(data.y_test))
    return model, to_float(data.x_test[:n]).to(dev), data.y_test[:n].to(dev), getattr(data, "name", name)


def _data_source(cfg: dict[str, Any]) -> str:
    """The test data a run trained with: its --data path (recorded as a string or as {"source": ...}) or --dataset."""
    data = cfg.get("data")
    if isinstance(data, dict):
        data = data.get("source")
    return data if isinstance(data, str) and data else str(cfg.get("dataset", "mnist"))


def _summary(res: dict[str, Any], run: str, dataset: str) -> dict[str, Any]:
    keep = ("clean_accuracy", "verified_accuracy", "method", "threat", "seconds", "n", "options", "certified_accuracy")
    out = {k: res[k] for k in keep}
    out.update(run=run, dataset=dataset, gap_note="verified accuracy is a lower bound on robust accuracy")
    return out


def certify_command(
    run: str = typer.Argument(..., help="A finished training run directory, or pretrained:NAME."),
    norm: str = typer.Option("linf", help="linf | l2 | l1 (smoothing: l2)"),
    eps: str | None = typer.Option(None, help="Radius ε in pixel units, e.g. 0.1 or 8/255 (or --curve)."),
    curve: str | None = typer.Option(None, "--curve", help="EPS1,EPS2,...: verified and attacked accuracy at each ε."),
    plot: Path | None = typer.Option(None, "--plot", help="With --curve: write certified accuracy against ε to this PNG."),
    attack: str = typer.Option("pgd", help="With --curve: the attack drawn beside the verified accuracy (none: no attack)."),
    method: str = typer.Option("crown", help="crown | crown-ibp | ibp | smoothing"),
    subset: int | None = typer.Option(None, help="Certify the first N test images  [default: all]"),
    batch_size: int = typer.Option(500, help="Examples per bound computation (smoothing: noisy copies per batch)."),
    sigma: float | None = typer.Option(None, help="smoothing: noise level σ of the smoothed classifier."),
    n: int = typer.Option(10_000, "--n", help="smoothing: noisy samples for the estimate."),
    n0: int = typer.Option(100, "--n0", help="smoothing: noisy samples for the guess."),
    alpha: float = typer.Option(0.001, help="smoothing: failure probability per example."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1", help="smoothing: radii for the certified accuracy, comma-separated."),
    seed: int = typer.Option(0, help="smoothing: seeds the noise."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow the run's recorded package.module:factory."),
) -> None:
    """Certify a trained model: verified accuracy (a provable lower bound on robust accuracy) and clean accuracy."""
    from robustopt.certify import METHODS, certify
    from robustopt.errors import ConfigError
    from robustopt.threat.model import ThreatModel
    from robustopt.training.config import parse_number

    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    if (eps is None) == (curve is None):
        raise ConfigError("pass either --eps E or --curve EPS1,EPS2,... (not both, not neither)")
    if curve is not None:
        _curve(run, norm, curve, plot, attack, method, subset, batch_size, as_json, data_dir, device, trust_code)
        return
    if plot is not None:
        raise ConfigError("--plot goes with --curve EPS1,EPS2,...")
    threat = ThreatModel(norm, parse_number(eps, "--eps"))
    extra: dict[str, Any] = {}
    if method == "smoothing":
        extra = {"sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "seed": seed, "radii": _radii(radii)}
    elif sigma is not None:
        raise ConfigError("--sigma goes with --method smoothing")
    model, x, y, dataset = _load(run, device, subset, data_dir, trust_code)
    res = _summary(certify(model, x, y, threat, method, batch_size=batch_size, **extra).to_dict(), str(run), dataset)
    if as_json:
        typer.echo(json.dumps(res, sort_keys=True))
        return
    typer.echo(f"clean accuracy     {res['clean_accuracy']:.4f}  (n={res['n']})")
    typer.echo(f"verified accuracy  {res['verified_accuracy']:.4f}  ({method}, {norm} eps={threat.eps:g}; a lower bound)")
    for r, acc in res["certified_accuracy"].items():
        typer.echo(f"certified at l2 radius {r:>5}  {acc:.4f}")
    typer.echo(f"time {res['seconds']:.1f} s")


def _curve(run: str, norm: str, curve: str, plot: Path | None, attack: str, method: str, subset: int | None, batch_size: int,
           as_json: bool, data_dir: Path | None, device: str | None, trust_code: bool) -> None:  # fmt: skip
    """``--curve``: verified (and attacked) accuracy at each ε, printed or as JSON, and the plot with ``--plot``."""
    from robustopt.certify import BOUND_METHODS
    from robustopt.certify.plots import certified_curve_plot
    from robustopt.cli.commands.evaluate import _check_output_path
    from robustopt.errors import ConfigError
    from robustopt.evaluation.attacks import check_attack
    from robustopt.evaluation.report import certified_curve

    if method not in BOUND_METHODS:
        raise ConfigError(f"--curve goes with --method {' | '.join(BOUND_METHODS)} (smoothing reports --radii instead)")
    eps = _radii(curve)
    if not eps or min(eps) < 0:
        raise ConfigError(f"--curve needs radii >= 0, comma-separated, got {curve!r}")
    chosen = None if attack == "none" else check_attack(attack)
    _check_output_path(plot, "--plot")
    model, x, y, dataset = _load(run, device, subset, data_dir, trust_code)
    res = certified_curve(model, x, y, norm, eps, chosen, certify=method, certify_batch_size=batch_size)
    res.update(run=str(run), dataset=dataset)
    if plot is not None:
        title = f"{run}: certified ({method}) vs {chosen or 'no attack'}, {len(y)} test images"
        res["plot"] = str(certified_curve_plot({norm: {str(run): res}}, plot, title=title))
    if as_json:
        typer.echo(json.dumps(res, sort_keys=True))
        return
    typer.echo(f"clean accuracy {res['clean']:.4f}  (n={res['n']}); verified ({method}) is a lower bound, {chosen} an upper")
    for e, v, a in zip(res["eps"], res["verified"], res["attacked"], strict=True):
        typer.echo(f"{norm} eps={e:<8g} verified {v:.4f}" + ("" if a is None else f"  {chosen} {a:.4f}  gap {a - v:.4f}"))
    if plot is not None:
        typer.echo(f"wrote {res['plot']}")


def _radii(text: str) -> list[float]:
    from robustopt.training.config import parse_number

    return [parse_number(part, "--radii") for part in text.split(",") if part.strip()]


def register(app: typer.Typer) -> None:
    app.command("certify")(certify_command)
