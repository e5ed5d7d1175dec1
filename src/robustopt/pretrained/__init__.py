"""Robust models that ship inside the package, loaded offline by name.

Each model is a finished run directory under ``robustopt/pretrained/NAME/`` (``model.safetensors``,
``config.json``, ``metrics.jsonl``), trained by the recipe of the same name (``robustopt recipes NAME``).
:func:`load_pretrained` returns it as :func:`robustopt.load_model` would: an ``nn.Module`` in eval mode that
takes ``[0, 1]`` inputs and returns logits; ``load_model("pretrained:NAME")`` is the same call.

    >>> from robustopt import load_pretrained
    >>> model = load_pretrained("mnist-linf-0.3")   # (B, 1, 28, 28) in [0, 1] -> (B, 10) logits
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

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


def load_pretrained(name: str, device: str | torch.device = "cpu", *, root: Path | None = None) -> nn.Module:
    """The shipped model ``name`` in eval mode on ``device``: [0, 1] inputs (B, C, H, W) -> logits (B, K).

    ``root`` (default: the package's ``pretrained/``) is where the named run directories live."""
    from robustopt.runs import load_model

    return load_model(pretrained_dir(name.removeprefix(PREFIX), root), device)


__all__ = ["PREFIX", "list_pretrained", "load_pretrained", "pretrained_dir", "pretrained_root", "resolve_run"]
