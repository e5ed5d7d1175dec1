"""The attack registry: discovered from the attack modules, options read from each attack's signature.

Every public module of :mod:`robustopt.evaluation.attacks` that defines a module-level
``ATTACKS: dict[str, Attack]`` contributes its entries; a module without one (``losses``) and
private modules (``_common``) are skipped. An entry is the attack function itself or a
``functools.partial`` of it (an alias such as ``bim``); nothing else adapts it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from pathlib import Path

from robustopt.errors import ConfigError
from robustopt.evaluation.attacks._common import Attack

PACKAGE = __name__.rpartition(".")[0]
POSITIONAL = ("model", "x", "y", "threat")
COUNTS = ("steps", "restarts", "n_targets", "search_steps", "queries")  # options that must be integers >= 1


def discover() -> dict[str, Attack]:
    """``{name: attack}`` from every public module of the package that defines ``ATTACKS``, in module order."""
    found: dict[str, Attack] = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        for name, attack in getattr(module, "ATTACKS", {}).items():
            if name in found:
                raise ConfigError(f"attack {name!r} is registered twice (again in {module.__name__})")
            found[name] = attack
    return found


def options_of(attack: Attack) -> dict[str, inspect.Parameter]:
    """The keyword-only options of an attack function or partial, ``{name: inspect.Parameter}``.

    The parameter carries the default (a partial's bound value for an alias) and the type
    hint as written (``parameter.annotation``, a string under postponed annotations).
    """
    params = inspect.signature(attack).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def accepts_any(attack: Attack) -> bool:
    """True when the attack takes ``**kwargs`` (a user's callable): every option is passed on unchecked."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(attack).parameters.values())


def name_of(attack: Attack) -> str:
    """A printable name for an attack function or partial."""
    if isinstance(attack, functools.partial):
        return name_of(attack.func)
    return getattr(attack, "__name__", type(attack).__name__)


def check_options(name: str, attack: Attack, options: dict[str, object]) -> None:
    """A ConfigError naming the valid options for an unknown one, or for a count that is not an integer >= 1."""
    valid = options_of(attack)
    unknown = sorted(set(options) - set(valid)) if not accepts_any(attack) else []
    if unknown:
        listed = ", ".join(valid) or "none"
        raise ConfigError(f"attack {name} has no option {', '.join(map(repr, unknown))}; its options are: {listed}")
    for key in COUNTS:
        value = options.get(key)
        if key in options and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"attack {name}: {key} must be an integer >= 1, got {value!r}")
