"""``robustopt stability``: minimal adversarial perturbations (:mod:`robustopt.evaluation.stability`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from robustopt.errors import ConfigError


def stability_command(
    run_dir: str = typer.Argument(..., help="A finished training run directory, or pretrained:NAME."),
    norm: str = typer.Option("l2", help="linf | l2 | l1"),
    method: str = typer.Option("deepfool", help="deepfool | pgd (binary search over ε)"),
    subset: int | None = typer.Option(1000, help="Use the first N test images."),
    compare: list[str] = typer.Option([], "--compare", help="Other run directories to measure and overlay."),
    out: Path | None = typer.Option(
        None, "--out", help="Histogram PNG  [default: RUN_DIR/stability_<norm>_<method>.png, or ./ for pretrained:NAME]"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow running the package.module:factory a run names."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Progress bars  [default: on a terminal]"),
) -> None:
    """Minimal adversarial perturbation statistics (median, mean, ρ_adv) and a histogram PNG."""
    from robustopt.cli.loaders import load_run
    from robustopt.evaluation.stability import METHODS, minimal_perturbations, plot_histogram, summary
    from robustopt.threat.model import ThreatModel

    threat = ThreatModel(norm, 1.0)
    png = _png_path(out, run_dir, norm, method)  # a bad --out fails before any attack runs
    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    show = sys.stderr.isatty() if progress is None else progress
    dists, stats = {}, {}
    for rd in [run_dir, *compare]:
        loaded = load_run(rd, device, subset, data_dir, trust_code)
        d = minimal_perturbations(loaded.model, loaded.x, loaded.y, threat, method=method, progress=show)
        dists[str(rd)], stats[str(rd)] = d, summary(d, threat.norm_of(loaded.x))
    png = plot_histogram(dists, png, xlabel=f"minimal {norm} perturbation ({method})")
    if as_json:
        typer.echo(json.dumps({"norm": norm, "method": method, "runs": stats, "histogram": str(png)}, sort_keys=True))
        return
    for rd, s in stats.items():
        line = f"found={s['found_fraction']:.3f} median={s['median']:.4g} mean={s['mean']:.4g} rho_adv={s['rho_adv']:.4g}"
        typer.echo(f"{rd}: n={s['n']} misclassified={s['misclassified']} (not counted) {line}")
    typer.echo(f"histogram {png}")


def _png_path(out: Path | None, run_dir: str, norm: str, method: str) -> Path:
    """Where the histogram goes: ``--out`` itself if it names a .png, inside it if it is a folder, else the run
    directory (the current directory for a shipped ``pretrained:NAME`` model, whose folder is the package's)."""
    from robustopt.pretrained import PREFIX

    name = f"stability_{norm}_{method}.png"
    if out is None:
        return Path(name) if str(run_dir).startswith(PREFIX) else Path(run_dir) / name
    if out.is_dir():
        return out / name
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must be a .png file or an existing folder")
    return out


def register(app: typer.Typer) -> None:
    app.command("stability")(stability_command)
