"""Robust models that ship inside the package, loaded offline by name.

Each model is a finished run directory under ``robustopt/pretrained/NAME/`` (``model.safetensors``,
``config.json``, ``metrics.jsonl``), trained by the recipe of the same name (``robustopt recipes NAME``).
:func:`robustopt.load_pretrained` returns it as :func:`robustopt.load_model` would: an ``nn.Module`` in eval mode that
takes ``[0, 1]`` inputs and returns logits; ``load_model("pretrained:NAME")`` is the same call.

    >>> from robustopt import load_pretrained
    >>> model = load_pretrained("mnist-linf-0.3")   # (B, 1, 28, 28) in [0, 1] -> (B, 10) logits

To ship a model: ``robustopt train --config recipes/NAME.toml --out R``, evaluate it, then copy ``R/config.json``,
``R/metrics.jsonl`` and the weights to ship as ``model.safetensors`` (``R/best.safetensors`` when the recipe keeps
the best epoch) into ``src/robustopt/pretrained/NAME/``. The content hash in the weights' metadata is checked on load.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from robustopt.errors import ConfigError

PREFIX = "pretrained:"
FILES = ("model.safetensors", "config.json")


def pretrained_root() -> Path:
    return Path(str(resources.files("robustopt") / "pretrained"))


def list_pretrained(root: Path | None = None) -> list[str]:
    """Names of the shipped models (directories holding weights and a config), sorted."""
    base = root or pretrained_root()
    return sorted(d.name for d in base.iterdir() if d.is_dir() and all((d / f).is_file() for f in FILES))


def pretrained_dir(name: str, root: Path | None = None) -> Path:
    """The run directory of shipped model ``name``; a one-line error listing the shipped names otherwise."""
    names = list_pretrained(root)
    if name not in names:
        shipped = ", ".join(names) or "none in this installation"
        raise ConfigError(f"unknown pretrained model {name!r}: shipped models are {shipped}")
    return (root or pretrained_root()) / name


def resolve_run(run_dir: str | Path) -> Path:
    """A run directory: ``pretrained:NAME`` becomes the shipped model's directory; anything else is returned as a Path."""
    text = str(run_dir)
    return pretrained_dir(text.removeprefix(PREFIX)) if text.startswith(PREFIX) else Path(run_dir)


__all__ = ["PREFIX", "list_pretrained", "pretrained_dir", "pretrained_root", "resolve_run"]
