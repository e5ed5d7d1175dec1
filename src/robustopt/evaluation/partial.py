"""Partial results of a long evaluation: saved after every batch, continued from, and never trusted blindly.

A partial file is JSON ``{"robustopt_partial": 1, "key": {...}, "clean": [bool], "robust": [bool],
"components": {name: int}}``. The key names the attack, threat, budget, seed, data and the
weights' hash, so a file belongs to exactly one evaluation. Any other file at the path (another
run's ``config.json``, a partial of another model, a hand-edited file) is refused before the
attack starts, never overwritten; a partial of the same model and data under other settings
(another ε, attack or budget) is started afresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustopt.errors import ConfigError
from robustopt.files import read_json, write_json

MARK = "robustopt_partial"
OWNER = ("model_sha256", "source_sha256", "data_sha256")  # whose results a file holds: never overwritten by another's


def load_partial(path: Path | None, key: dict[str, Any]) -> tuple[list[bool], list[bool], dict[str, int]]:
    """Clean and robust flags (and cascade counts) of the examples an earlier run with the same key has done.

    Refuses (ConfigError, one line) a file that is not a partial result of this evaluation."""
    if path is None or not path.exists():
        return [], [], {}
    saved = read_json(path)
    if not isinstance(saved, dict) or saved.get(MARK) != 1:
        raise ConfigError(f"--partial {path} exists and is not a robustopt partial result; choose another path (it is untouched)")
    old = saved.get("key") if isinstance(saved.get("key"), dict) else {}
    if any(old.get(k) != key.get(k) for k in OWNER):
        raise ConfigError(f"--partial {path} holds partial results of another model or data set; delete it or pick another path")
    if old != key:  # the same model and data, other settings: start afresh (the file is overwritten)
        return [], [], {}
    return _validated(saved, key["n"], path)


def _validated(saved: dict[str, Any], n: int, path: Path) -> tuple[list[bool], list[bool], dict[str, int]]:
    clean, robust, comps = saved.get("clean"), saved.get("robust"), saved.get("components") or {}
    ok = isinstance(clean, list) and isinstance(robust, list) and len(clean) == len(robust) <= n
    ok = ok and all(isinstance(v, bool) for v in clean + robust) and all(r <= c for c, r in zip(clean, robust, strict=True))
    ok = ok and isinstance(comps, dict) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= n
                                                for v in comps.values())  # fmt: skip
    if not ok:
        raise ConfigError(f"--partial {path} is damaged or was edited (flags or counts out of range); delete it and rerun")
    return list(clean), list(robust), dict(comps)


def check_partial_path(path: Path | None, key: dict[str, Any]) -> None:
    """Before any attack: the path is free, or holds this evaluation's partial results (see :func:`load_partial`)."""
    load_partial(path, key)
    if path is not None and path.parent and not path.parent.exists():
        raise ConfigError(f"--partial {path}: the directory {path.parent} does not exist")


def save_partial(path: Path, key: dict[str, Any], clean: list[bool], robust: list[bool], components: dict[str, int]) -> None:
    write_json(path, {MARK: 1, "key": key, "clean": clean, "robust": robust, "components": components})
