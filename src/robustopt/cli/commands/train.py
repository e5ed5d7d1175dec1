"""``robustopt train``: flags (and ``--config FILE.toml``) mapped onto :class:`TrainConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from robustopt.errors import ConfigError
from robustopt.training.config import CONFIG_KEYS, make_config, read_toml

RUNTIME_KEYS = {"out", "data_dir", "device", "resume", "overwrite"}


def _runtime_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Pop the config file's non-training keys (out, data_dir, device, resume, overwrite), type-checked."""
    runtime = {k: values.pop(k) for k in list(values) if k in RUNTIME_KEYS}
    for key, value in runtime.items():
        want = bool if key in ("resume", "overwrite") else str
        if not isinstance(value, want):
            raise ConfigError(f"config key {key} must be {'true or false' if want is bool else 'a string'}, got {value!r}")
    return runtime


def train_command(
    config: Path | None = typer.Option(None, "--config", help="TOML file with the same keys as the flags; flags win."),
    dataset: str | None = typer.Option(None, help="mnist | fashion-mnist | cifar10  [default: mnist]"),
    model: str | None = typer.Option(None, help="paper-mnist | paper-cifar | resnet18 | mlp  [default: paper-mnist]"),
    method: str | None = typer.Option(None, help="standard | goodfellow | robust | pgd | fast | free  [default: robust]"),
    norm: str | None = typer.Option(None, help="linf | l2 | l1  [default: linf]"),
    eps: str | None = typer.Option(None, help="Radius ε, e.g. 0.3 or 8/255  [default: 0.1]"),
    eps_units: str | None = typer.Option(None, help="pixel | standardized (the paper's units: ε·σ in pixels)  [default: pixel]"),
    alpha: str | None = typer.Option(None, help="Weight of the clean loss  [default: 0.5 goodfellow, else 0]"),
    steps: int | None = typer.Option(None, help="Inner-max steps  [default: 1; 10 for pgd]"),
    step_size: str | None = typer.Option(None, help="Inner-max step  [default: ε; 2.5ε/steps for pgd; 1.25ε fast]"),
    replays: int | None = typer.Option(None, help="Free training: replays per minibatch  [default: 4]"),
    epochs: int | None = typer.Option(None, help="[default: 10]"),
    batch_size: int | None = typer.Option(None, help="[default: 100]"),
    lr: str | None = typer.Option(None, help="[default: 0.01]"),
    momentum: str | None = typer.Option(None, help="[default: 0.9]"),
    weight_decay: str | None = typer.Option(None, help="L2 penalty  [default: 1e-3]"),
    schedule: str | None = typer.Option(None, help="constant | step | onecycle  [default: constant]"),
    lr_step: int | None = typer.Option(None, help="step schedule: halve lr every N epochs  [default: 25]"),
    subset: int | None = typer.Option(None, help="Train on the first N training images."),
    test_subset: int | None = typer.Option(None, help="Per-epoch test accuracy on the first N test images  [default: all]"),
    seed: int | None = typer.Option(None, help="Seeds data order, init, dropout and random starts  [default: 0]"),
    amp: str | None = typer.Option(None, help="off | bf16 | fp16 mixed precision  [default: off]"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last"),
    sync_bn: bool | None = typer.Option(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun."),
    deterministic: bool | None = typer.Option(None, "--deterministic/--no-deterministic"),
    checkpoint_minutes: str | None = typer.Option(None, help="Also checkpoint every N minutes  [default: 10]"),
    out: Path | None = typer.Option(None, "--out", help="Run directory  [default: runs/<method>-<norm>]"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever --out holds."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train a classifier by robust optimisation (Algorithm 1) and save it to a run directory."""
    from robustopt.training.loop import train

    flags = {k: v for k, v in locals().items() if k in CONFIG_KEYS and v is not None}
    values: dict[str, Any] = read_toml(config, CONFIG_KEYS | RUNTIME_KEYS) if config else {}
    values.update(flags)
    runtime = _runtime_keys(values)
    cfg = make_config(values)
    run_dir = out or runtime.get("out") or Path("runs") / f"{cfg.method}-{cfg.norm}"
    train(
        cfg,
        run_dir,
        data_dir=data_dir or runtime.get("data_dir"),
        device=device or runtime.get("device"),
        resume=resume or bool(runtime.get("resume")),
        overwrite=overwrite or bool(runtime.get("overwrite")),
        progress_bar=progress,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(f"saved {run_dir}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
