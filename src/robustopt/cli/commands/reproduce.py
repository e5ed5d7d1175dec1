"""``robustopt reproduce {mnist,cifar10}``: the paper's experiments and a report, in one command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from robustopt.errors import ConfigError


def reproduce_command(
    dataset: str = typer.Argument(..., help="mnist | cifar10"),
    quick: bool = typer.Option(False, "--quick", help="Same as --schedule quick (minutes on a CPU)."),
    schedule: str | None = typer.Option(
        None, "--schedule", help="quick | full | authors (the authors' 120 epochs on MNIST: for a GPU)  [default: full]"
    ),
    seeds: int | None = typer.Option(
        None, "--seeds", help="Train and evaluate every net K times (seeds 1..K); report mean ± std  [default: 1]"
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory  [default: reproduce-<dataset>[-<schedule>]]"),
    config: Path | None = typer.Option(None, "--config", help="TOML file overriding fields of the schedule."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Progress bars  [default: on a terminal]"),
) -> None:
    """Train the paper's nets (reusing finished runs in OUT), evaluate them on its protocol, write OUT/report.md."""
    from robustopt.reproduce.runner import load_schedule, reproduce

    if quick and schedule not in (None, "quick"):
        raise ConfigError(f"--quick and --schedule {schedule} contradict each other; pass one of them")
    plan = "quick" if quick else schedule or "full"
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be a whole number >= 1, got {seeds}")
    plan_schedule = load_schedule(dataset, plan, config, seeds=seeds)  # validated in full before anything trains
    where = out or Path(f"reproduce-{dataset}{'' if plan == 'full' else '-' + plan}")
    show = sys.stderr.isatty() if progress is None else progress
    reproduce(plan_schedule, where, plan=plan, data_dir=data_dir, device=device, progress=show, log=typer.echo)
    typer.echo(f"report: {where / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_command)
