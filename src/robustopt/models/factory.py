"""User architectures named as ``package.module:factory``.

A run directory records the spec string (and the keyword arguments the factory was called
with), so :func:`robustopt.load_model` can rebuild the architecture in a fresh process
before loading the weights. The factory is any callable returning an ``nn.Module`` that takes
inputs in the threat model's bounds (``[0, 1]`` by default) and returns logits.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from robustopt.errors import ConfigError

SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_factory_spec(name: str) -> bool:
    """True for ``package.module:callable`` (a built-in model name never contains a colon)."""
    return isinstance(name, str) and ":" in name


def import_factory(spec: str) -> Callable[..., Any]:
    """Import ``package.module:attr[.attr]``; the current directory is searched as ``python -m`` would."""
    if not SPEC.match(spec or ""):
        raise ConfigError(f"--model {spec!r} is not of the form package.module:factory (e.g. mynets.small:build)")
    module_name, attr_path = spec.split(":", 1)
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # a user's module beside them imports as it would with `python -m`
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure inside the user's module is theirs to see, in one line
        raise ConfigError(f"--model {spec}: cannot import {module_name!r} ({type(e).__name__}: {e}); check PYTHONPATH") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--model {spec}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--model {spec}: {attr_path!r} is not callable")
    return obj


def build_from_spec(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call the factory named by ``spec`` with ``kwargs``; it must return an ``nn.Module``."""
    factory = import_factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's factory failing (even by sys.exit) is a configuration problem
        raise ConfigError(f"--model {spec}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
