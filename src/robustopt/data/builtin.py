"""The built-in datasets: MNIST (bundled), Fashion-MNIST, CIFAR-10 and CIFAR-100, their statistics and where their files are.

Files that are not bundled are searched for in the directories of
:func:`robustopt.data.locations.search_dirs` (then, for Fashion-MNIST, Debian's
``dataset-fashion-mnist`` package), in any of these layouts: ``NAME.npz`` (or ``NAME_WITH_UNDERSCORES.npz``)
with ``x_train, y_train, x_test, y_test``; the four IDX files (raw or ``.gz``) in ``NAME/`` or
the directory itself; CIFAR-10's ``cifar-10-batches-bin/`` (or ``cifar10/``); CIFAR-100's
``cifar-100-binary/`` (or ``cifar100/``) with fine labels. Nothing is downloaded implicitly:
see :mod:`robustopt.data.download`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustopt.data.formats import read_cifar100_bin, read_cifar_bin, read_idx, read_npz
from robustopt.data.locations import DEBIAN_FASHION, bundled_mnist_path, search_dirs, sha256_file
from robustopt.errors import DataError

MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"

# Per-channel mean and std of each training set, on the [0, 1] scale.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
NUM_CLASSES: dict[str, int] = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
DATASETS = tuple(STATS)
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def builtin_arrays(name: str, data_dir: str | Path | None) -> dict[str, np.ndarray]:
    """The raw arrays of built-in dataset ``name``; MNIST falls back to the bundled copy, its sha256 verified."""
    arrays = locate(name, data_dir) if name != "mnist" or data_dir else None
    if arrays is not None:
        return arrays
    if name == "mnist":
        path = bundled_mnist_path()
        if not path.is_file():
            raise DataError(f"bundled MNIST is missing at {path}; reinstall robustopt")
        if sha256_file(path) != MNIST_SHA256:
            raise DataError(f"bundled MNIST at {path} fails its sha256 check; reinstall robustopt")
        return read_npz(path)
    looked = ", ".join(str(d) for d in search_dirs(data_dir))
    hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
    raise DataError(f"dataset {name!r} not found (looked in {looked}); run `robustopt download {name}`{hint}, or pass --data-dir")


def locate(name: str, data_dir: str | Path | None) -> dict[str, np.ndarray] | None:
    """Search the lookup directories for ``name`` in any supported format; None when absent."""
    dirs = search_dirs(data_dir)
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION.parent)
    for d in dirs:
        for cand in (d / f"{name}.npz", d / f"{name.replace('-', '_')}.npz"):
            if cand.exists():  # not is_file(): a FIFO or device by that name is an error, not silently skipped
                return read_npz(cand)
        found = _find_cifar100(d) if name == "cifar100" else _find_cifar10(d) if name == "cifar10" else _find_idx(d, name)
        if found is not None:
            return found
    return None


def _find_cifar10(directory: Path) -> dict[str, np.ndarray] | None:
    bdir = next((p for p in (directory / "cifar-10-batches-bin", directory / "cifar10") if (p / "test_batch.bin").exists()), None)
    if bdir is None:
        return None
    xtr, ytr = read_cifar_bin([bdir / f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = read_cifar_bin([bdir / "test_batch.bin"])
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def _find_cifar100(directory: Path) -> dict[str, np.ndarray] | None:
    """``train.bin``/``test.bin`` in ``cifar-100-binary/`` (the archive's folder) or ``cifar100/``, with label names."""
    found = next((p for p in (directory / "cifar-100-binary", directory / "cifar100") if (p / "test.bin").is_file()), None)
    if found is None:
        return None
    xtr, ytr = read_cifar100_bin(found / "train.bin")
    xte, yte = read_cifar100_bin(found / "test.bin")
    arrays = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
    names_file = found / "fine_label_names.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == NUM_CLASSES["cifar100"]:
            arrays["class_names"] = np.array(names)
    return arrays


def _find_idx(directory: Path, name: str) -> dict[str, np.ndarray] | None:
    for d in (directory / name, directory):
        found = {}
        for key, stem in IDX_NAMES.items():
            cand = next((c for c in (d / stem, d / f"{stem}.gz") if c.exists()), None)
            if cand is not None:
                found[key] = cand
        if len(found) == 4:
            return {k: read_idx(p) for k, p in found.items()}
    return None
