"""Where dataset files live: the lookup directories, the user cache and the bundled MNIST.

Lookup order for files that are not bundled: ``--data-dir``, ``$ROBUSTOPT_DATA``, then the user
cache, ``$XDG_CACHE_HOME/robustopt`` (``~/.cache/robustopt`` when ``XDG_CACHE_HOME`` is unset).
The same cache holds downloads (``robustopt download NAME``) and decoded image folders
(``folders/<key>.npz``, see :mod:`robustopt.data.folders`); deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

# Debian's ``dataset-fashion-mnist`` package installs the IDX files here.
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/robustopt``, or ``~/.cache/robustopt``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "robustopt"


def search_dirs(data_dir: str | Path | None) -> list[Path]:
    """Directories searched for dataset files, in order."""
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("ROBUSTOPT_DATA"):
        dirs.append(Path(os.environ["ROBUSTOPT_DATA"]))
    dirs.append(cache_dir())
    return dirs


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundled_mnist_path() -> Path:
    return Path(str(resources.files("robustopt") / "_data" / "mnist.npz"))


def shown(path: str | Path) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 appear as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
