"""The user's own data: an ``.npz`` of arrays or an image folder, as a :class:`~robustopt.data.datasets.Dataset`.

An ``.npz`` holds ``x_train, y_train, x_test, y_test`` (optionally ``class_names``, a string
array). Inputs are uint8 (0–255) or float in [0, 1], one of

* (N, D): feature vectors, kept as they are (the threat model's ε is in the same units);
* (N, H, W): grayscale images, read as (N, 1, H, W);
* (N, H, W, C) with C ≤ 4 < H: channels-last images, transposed to (N, C, H, W);
* (N, C, H, W): channels-first images (every other 4-d array).

Labels are integers 0..K−1; K is the largest training label + 1 (or the number of class names),
and training must contain at least two classes. Image folders are read by
:mod:`robustopt.data.folders`. For both, ``mean``/``std`` are computed from the training inputs,
per channel for images and per feature for vectors, on the [0, 1] scale; a constant channel gets
std 1 (it is only centred), so the nets never divide by zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustopt.data.datasets import Dataset, read_npz
from robustopt.errors import DataError

_CHUNK = 1024  # examples per block when computing statistics: float64 copies of at most one block


def images_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """A user array in one of the accepted layouts -> (N, D) or (N, C, H, W) (a view where possible)."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        channels_last = x.shape[-1] <= 4 < x.shape[1]
        return x.transpose(0, 3, 1, 2) if channels_last else x
    raise DataError(f"{where}: inputs have shape {x.shape}; expected (N, D), (N, H, W), (N, H, W, C) or (N, C, H, W)")


def check_inputs(x: np.ndarray, where: str) -> torch.Tensor:
    """uint8 kept as is; float checked finite and in [0, 1] and stored as float32."""
    if len(x) == 0:
        raise DataError(f"{where}: no examples")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: inputs must be uint8 (0-255) or float in [0, 1], got dtype {x.dtype}; convert them first")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: inputs contain NaN or infinite values; clean the data first")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{where}: float inputs must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]; rescale them (e.g. min-max)")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def check_user_labels(y_train: np.ndarray, y_test: np.ndarray, n_train: int, n_test: int, where: str, k: int | None) -> int:
    """Validate both label arrays; return the number of classes K."""
    for split, y, n in (("y_train", y_train, n_train), ("y_test", y_test, n_test)):
        if y.ndim != 1 or len(y) != n:
            raise DataError(f"{where} {split}: labels have shape {y.shape}, expected ({n},) to match the inputs")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where} {split}: labels must be integers 0..K-1, got dtype {y.dtype}")
        if len(y) and y.min() < 0:
            raise DataError(f"{where} {split}: labels must be >= 0, found {int(y.min())}")
    k = int(y_train.max()) + 1 if k is None else k
    if len(np.unique(y_train)) < 2:
        raise DataError(f"{where}: the training labels hold only one class; a classifier needs at least two")
    if y_train.max() >= k or (len(y_test) and y_test.max() >= k):
        raise DataError(f"{where}: labels must lie in 0..{k - 1} (the classes), found {int(max(y_train.max(), y_test.max()))}")
    return k


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


def dataset_from_arrays(
    arrays: dict[str, np.ndarray], *, name: str, kind: str, where: str, class_names: tuple[str, ...] | None = None
) -> Dataset:
    """Validate user arrays (any accepted layout) and build a Dataset with statistics from the training inputs."""
    xs = {s: images_nchw(np.asarray(arrays[f"x_{s}"]), f"{where} x_{s}") for s in ("train", "test")}
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        shapes = f"x_train {xs['train'].shape[1:]}, x_test {xs['test'].shape[1:]}"
        raise DataError(f"{where}: examples have different shapes ({shapes}); they must match")
    x_train, x_test = check_inputs(xs["train"], f"{where} x_train"), check_inputs(xs["test"], f"{where} x_test")
    y_train, y_test = np.asarray(arrays["y_train"]), np.asarray(arrays["y_test"])
    k = check_user_labels(y_train, y_test, len(x_train), len(x_test), where, len(class_names) if class_names else None)
    mean, std = channel_stats(x_train)
    y_tr, y_te = torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64))
    return Dataset(name, x_train, y_tr, x_test, y_te, mean, std, k, class_names, kind)


def _npz_class_names(path: Path) -> tuple[str, ...] | None:
    with np.load(path, allow_pickle=False) as z:
        if "class_names" not in z.files:
            return None
        names = z["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: class_names must be a 1-d array of strings, got {names.dtype} {names.shape}")
    return tuple(str(n) for n in names)


def load_user_data(path: Path) -> Dataset:
    """An ``.npz`` file or an image folder at ``path`` as a Dataset named by its absolute path."""
    path = path.expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give an .npz with x_train, y_train, x_test, y_test or an image folder")
    name = str(path.resolve())
    if path.is_dir():
        from robustopt.data.folders import read_image_folder  # local: Pillow is imported only for folders

        arrays, names = read_image_folder(path)
        return dataset_from_arrays(arrays, name=name, kind="folder", where=str(path), class_names=names)
    arrays = read_npz(path)
    names = _npz_class_names(path)
    return dataset_from_arrays(arrays, name=name, kind="npz", where=str(path), class_names=names)
