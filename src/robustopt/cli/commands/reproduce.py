"""``robustopt reproduce {mnist,cifar10}``: the paper's experiments and a report, in one command."""

from __future__ import annotations

from pathlib import Path

import typer


def reproduce_command(
    dataset: str = typer.Argument(..., help="mnist | cifar10"),
    quick: bool = typer.Option(False, "--quick", help="A small schedule (minutes on a CPU) instead of the full one."),
    out: Path | None = typer.Option(None, "--out", help="Output directory  [default: reproduce-<dataset>[-quick]]"),
    config: Path | None = typer.Option(None, "--config", help="TOML file overriding fields of the schedule."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train the paper's nets (reusing finished runs in OUT), evaluate them on its protocol, write OUT/report.md."""
    from robustopt.reproduce.runner import load_schedule, reproduce

    schedule = load_schedule(dataset, quick, config)
    where = out or Path(f"reproduce-{dataset}{'-quick' if quick else ''}")
    reproduce(schedule, where, quick=quick, data_dir=data_dir, device=device, progress=progress, log=typer.echo)
    typer.echo(f"report: {where / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_command)
