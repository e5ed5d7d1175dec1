"""``robustopt download NAME``: fetch a dataset with checksum verification."""

from __future__ import annotations

from pathlib import Path

import typer


def download_command(
    name: str = typer.Argument(..., help="mnist | fashion-mnist | cifar10 | cifar100"),
    dest: Path | None = typer.Option(None, "--dest", help="Target directory  [default: the user cache]"),
) -> None:
    """Download a dataset's canonical files and verify their checksums (never done implicitly)."""
    from robustopt.data.download import download

    typer.echo(f"downloaded and verified {name} into {download(name, dest)}")


def register(app: typer.Typer) -> None:
    app.command("download")(download_command)
