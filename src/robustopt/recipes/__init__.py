"""Training recipes: TOML files of :class:`~robustopt.training.config.TrainConfig` keys that reach published numbers.

Each recipe is ``NAME.toml`` in this package (and, in a clone, under ``recipes/`` at the repository root), run as
``robustopt train --config recipes/NAME.toml`` and listed by ``robustopt recipes``. Its first comment lines say,
as ``# key: value``, the ``paper`` it follows, the ``anchor`` (the published clean and robust accuracy, with the
attack), the ``device`` it is meant for and what this project ``measured`` with it (or that it has not been run).
Names resolve here, at the edge; training only ever sees a TrainConfig.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from robustopt.errors import ConfigError

HEADER = re.compile(r"^#\s*(paper|anchor|device|measured):\s*(.+?)\s*$")


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its name, file and the paper, anchor, device and measured result from its header comments."""

    name: str
    path: Path
    paper: str
    anchor: str
    device: str
    measured: str


def recipes_dir() -> Path:
    return Path(str(resources.files("robustopt") / "recipes"))


def read_header(path: Path) -> dict[str, str]:
    """The ``# paper:``, ``# anchor:``, ``# device:`` and ``# measured:`` lines at the top of a recipe file."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = HEADER.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, sorted by name."""
    out = []
    for path in sorted(recipes_dir().glob("*.toml")):
        head = read_header(path)
        fields = [head.get(k, "?") for k in ("paper", "anchor", "device")]
        out.append(Recipe(path.stem, path, *fields, head.get("measured", "not run by this project")))
    return out


def resolve(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path as given, else the shipped recipe of that name (``.toml`` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".toml")
    shipped = recipes_dir() / f"{name}.toml"
    if str(path.parent) in (".", "recipes") and shipped.is_file():
        return shipped
    names = ", ".join(r.name for r in list_recipes())
    raise ConfigError(f"unknown recipe {str(name_or_path)!r}: not a file, and the shipped recipes are {names}")


def load_recipe(name_or_path: str | Path, **overrides: object):  # -> TrainConfig (imported late: no import cycle)
    """The validated :class:`TrainConfig` of a recipe, with ``overrides`` (TrainConfig keys) on top."""
    from robustopt.training.config import CONFIG_KEYS, make_config, read_toml

    path = resolve(name_or_path)
    values = read_toml(path, CONFIG_KEYS)
    values.update(overrides)
    try:
        return make_config(values)
    except ConfigError as e:
        raise ConfigError(f"recipe {path.name}: {e}") from None


__all__ = ["Recipe", "list_recipes", "load_recipe", "read_header", "recipes_dir", "resolve"]
