"""The entry point: :func:`load_dataset` turns a built-in name or a path to the user's data into a :class:`Dataset`.

Built-in names are ``mnist`` (bundled), ``fashion-mnist``, ``cifar10`` and ``cifar100``
(:mod:`robustopt.data.builtin` says where their files are looked for; nothing is downloaded
implicitly). A path (``--data PATH``) loads the user's data:

* an ``.npz`` with ``x_train, y_train, x_test, y_test`` (optionally ``class_names``, a string
  array). Inputs are uint8 (0–255) or float in [0, 1], one of (N, D) feature vectors (kept as
  they are: ε is in the same units), (N, H, W) grayscale images, (N, H, W, C) with C ≤ 4 < H
  channels-last images, or (N, C, H, W) (every other 4-d array);
* an image folder (:mod:`robustopt.data.folders`).

Labels are integers 0..K−1; K is the largest training label + 1 (or the number of class names),
and training must contain at least two classes. For user data ``mean``/``std`` are computed from
the training inputs, per channel for images and per feature for vectors, on the [0, 1] scale; a
constant channel gets std 1 (it is only centred), so the nets never divide by zero.

Layout of the package: :mod:`~robustopt.data.formats` reads files, :mod:`~robustopt.data.folders`
decodes image folders, :mod:`~robustopt.data.validation` checks arrays and limits, this module
assembles; :mod:`~robustopt.data.fingerprint` identifies data for a run. Images are kept as uint8
(N, C, H, W) and converted to float [0, 1] per batch (:func:`to_float`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustopt.data.builtin import DATASETS, NUM_CLASSES, SHAPES, STATS, builtin_arrays
from robustopt.data.folders import read_image_folder
from robustopt.data.formats import read_npz
from robustopt.data.locations import shown
from robustopt.data.validation import (
    builtin_labels,
    builtin_layout,
    class_name_tuple,
    input_tensor,
    user_class_count,
    user_layout,
)
from robustopt.errors import DataError

__all__ = ["DATASETS", "NUM_CLASSES", "SHAPES", "STATS", "Dataset", "channel_stats", "load_dataset", "to_float"]

_CHUNK = 1024  # examples per block when computing statistics: float64 copies of at most one block


@dataclass(frozen=True)
class Dataset:
    """A classification dataset in memory.

    x: uint8 or float in [0, 1], images (N, C, H, W) or feature vectors (N, D); y: int64 (N,) in
    0..num_classes-1. ``mean``/``std`` are the training data's per-channel (per-feature) statistics
    the built-in nets normalise with. ``name`` is a built-in name or the data's absolute path (so
    ``load_dataset(name)`` reloads it); ``kind`` is the built-in name, ``"npz"`` or ``"folder"``
    (with ``input_shape`` it picks the augmentation default, :func:`robustopt.data.augment.default_augment`);
    ``class_names`` maps label k to a name when known.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    class_names: tuple[str, ...] | None = None
    kind: str = ""  # empty: the same as name (a built-in dataset)

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", self.name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images, (D,) for feature vectors."""
        return tuple(self.x_train.shape[1:])

    def subset(self, n: int | None) -> Dataset:
        """The first ``n`` training images (all when ``n`` is None)."""
        if n is None:
            return self
        if n < 1 or n > len(self.y_train):
            raise DataError(f"--subset must be between 1 and {len(self.y_train)}, got {n}")
        return dataclasses.replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images pass through."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std over examples (and pixels) per channel of (N, C, H, W), per feature of (N, D), on [0, 1].

    Accumulated in float64 over blocks of examples, so a 50,000-image dataset never gets a float copy.
    """
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    c = x.shape[1]
    total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(x), _CHUNK):
        block = x[start : start + _CHUNK].double().div_(scale).transpose(0, 1).reshape(c, -1)
        total += block.sum(1)
        total_sq += block.square().sum(1)
        count += block.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant channel: centre it, do not divide by ~0
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def builtin_dataset(name: str, arrays: dict[str, np.ndarray], where: str) -> Dataset:
    """Validate a built-in dataset's raw arrays (fixed shape and class count) and build its :class:`Dataset`."""
    shape, (mean, std), k = SHAPES[name], STATS[name], NUM_CLASSES[name]
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        x = builtin_layout(arrays[f"x_{split}"], shape, f"{where} x_{split}")
        out[f"x_{split}"] = input_tensor(x, f"{where} x_{split}")
        out[f"y_{split}"] = builtin_labels(arrays[f"y_{split}"], len(x), k, f"{where} y_{split}")
    names = class_name_tuple(arrays["class_names"], where) if "class_names" in arrays else None
    return Dataset(name, out["x_train"], out["y_train"], out["x_test"], out["y_test"], mean, std, k, names)


def user_dataset(
    arrays: dict[str, np.ndarray], *, name: str, kind: str, where: str, class_names: tuple[str, ...] | None = None
) -> Dataset:
    """Validate user arrays (any accepted layout) and build a Dataset with statistics from the training inputs."""
    xs = {s: user_layout(np.asarray(arrays[f"x_{s}"]), f"{where} x_{s}") for s in ("train", "test")}
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        shapes = f"x_train {xs['train'].shape[1:]}, x_test {xs['test'].shape[1:]}"
        raise DataError(f"{where}: examples have different shapes ({shapes}); they must match")
    y_train, y_test = np.asarray(arrays["y_train"]), np.asarray(arrays["y_test"])
    sizes = (len(xs["train"]), len(xs["test"]))
    for split, n in zip(("train", "test"), sizes, strict=True):
        if n == 0:
            raise DataError(f"{where} x_{split}: no examples")
    k = user_class_count(y_train, y_test, sizes, where, len(class_names) if class_names else None)
    x_train, x_test = input_tensor(xs["train"], f"{where} x_train"), input_tensor(xs["test"], f"{where} x_test")
    mean, std = channel_stats(x_train)
    y_tr, y_te = torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64))
    return Dataset(name, x_train, y_tr, x_test, y_te, mean, std, k, class_names, kind)


def load_user_data(path: Path) -> Dataset:
    """An ``.npz`` file or an image folder at ``path`` as a Dataset named by its absolute path."""
    path = path.expanduser()
    where = shown(path)
    if not path.exists():
        raise DataError(f"{where}: no such file or folder; give an .npz with x_train, y_train, x_test, y_test or an image folder")
    name = str(path.resolve())
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: the path is not valid UTF-8, so a run could not record it; rename it") from None
    if path.is_dir():
        arrays, names = read_image_folder(path)
        return user_dataset(arrays, name=name, kind="folder", where=where, class_names=names)
    arrays = read_npz(path)
    names = class_name_tuple(arrays["class_names"], f"{where} class_names") if "class_names" in arrays else None
    return user_dataset(arrays, name=name, kind="npz", where=where, class_names=names)


def looks_like_path(name: str | Path) -> bool:
    """True for what can only be a path (a Path, a separator, an ``.npz`` suffix) or an existing file or folder."""
    text = str(name)
    return isinstance(name, Path) or os.sep in text or "/" in text or text.endswith(".npz") or Path(text).exists()


def load_dataset(name: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """Load ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, or the user's data at a path.

    MNIST is bundled (its sha256 is verified on every load); the others are searched for
    (see :mod:`robustopt.data.builtin`) and a clear error says how to get them when missing. A path to an
    ``.npz`` with ``x_train, y_train, x_test, y_test`` or to an image folder loads that data
    (``data_dir`` is then not used). A built-in name wins over a same-named folder in the current
    directory: write ``./mnist`` for the folder.
    """
    if name not in STATS and looks_like_path(name):
        return load_user_data(Path(name))
    if name not in STATS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or a path to an .npz or image folder")
    return builtin_dataset(str(name), builtin_arrays(str(name), data_dir), str(name))
