"""``robustopt recipes [NAME]``: the shipped training recipes, or one recipe's file."""

from __future__ import annotations

import typer


def recipes_command(
    name: str | None = typer.Argument(None, help="A recipe to show (its path and its TOML text)."),
    path_only: bool = typer.Option(False, "--path", help="Print only the recipe file's path."),
) -> None:
    """List the recipes (name, paper, published and measured results, device), or print one: `robustopt train --config FILE`."""
    from robustopt.recipes import list_recipes, resolve

    if name is not None:
        path = resolve(name)
        typer.echo(str(path) if path_only else f"# {path}\n{path.read_text()}")
        return
    for r in list_recipes():
        typer.echo(f"{r.name}\n    paper:     {r.paper}\n    published: {r.anchor}\n    measured:  {r.measured}\n"
                   f"    device:    {r.device}")  # fmt: skip
    typer.echo('run one: robustopt train --config recipes/NAME.toml (in a clone), or --config "$(robustopt recipes NAME --path)"')


def register(app: typer.Typer) -> None:
    app.command("recipes")(recipes_command)
