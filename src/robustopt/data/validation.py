"""Checks of data before it becomes tensors: layouts, dtypes, ranges, labels, and the stated size limits.

Every check raises :class:`~robustopt.errors.DataError` with one line that names the data and the fix.
Limits are checked from headers (npz/zip member sizes, image headers, the largest label) before
anything of that size is allocated, so a small file that claims a huge payload is a clear error,
never a ``MemoryError``:

* :data:`MAX_DATA_BYTES` (2 GiB; ``$ROBUSTOPT_MAX_DATA_BYTES`` raises or lowers it): the arrays of
  one dataset file (all of an ``.npz``'s members, uncompressed) or one decoded image folder;
* :data:`MAX_IMAGE_PIXELS` (4096 × 4096): width × height of one image in an image folder;
* :data:`MAX_CLASSES` (100,000): the class count K = largest label + 1 (labels are indices 0..K−1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from robustopt.errors import DataError

MAX_DATA_BYTES = 2 << 30
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_CLASSES = 100_000
LIMIT_ENV = "ROBUSTOPT_MAX_DATA_BYTES"

# Keys recognised in dict items of a torch Dataset (Hugging Face style): exactly one of each must be present.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "features")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


# ---------------------------------------------------------------- limits


def data_byte_limit() -> int:
    """The byte limit for one dataset's arrays: ``$ROBUSTOPT_MAX_DATA_BYTES`` when set, else :data:`MAX_DATA_BYTES`."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return MAX_DATA_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise DataError(f"${LIMIT_ENV} must be a positive number of bytes, got {raw!r}")
    return int(raw)


def check_data_bytes(where: str, nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` of arrays above :func:`data_byte_limit`, before they are read."""
    limit = data_byte_limit()
    if nbytes > limit:
        raise DataError(
            f"{where}: {what} would take {nbytes / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB limit for one "
            f"dataset; use a smaller file, or raise ${LIMIT_ENV} if the machine has the memory"
        )


def check_image_pixels(where: str, width: int, height: int) -> None:
    """Refuse an image larger than :data:`MAX_IMAGE_PIXELS`, from its header (before it is decoded)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{where}: image is {width}×{height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
            "(4096×4096); resize the images first"
        )


def check_class_limit(k: int, where: str) -> None:
    """Refuse a class count above :data:`MAX_CLASSES` (a label of 10⁹ would mean a 10⁹-way classifier)."""
    if k > MAX_CLASSES:
        raise DataError(
            f"{where}: the largest label is {k - 1:,}, so K = {k:,} classes, more than the limit of {MAX_CLASSES:,}; "
            "labels must be class indices 0..K-1 (remap them, e.g. numpy.unique(y, return_inverse=True))"
        )


def check_class_count(found: int, recorded: int, where: str = "data") -> None:
    """Refuse data with more classes than a run or model was built for (a data set that gained classes).

    ``found``: the data's class count now (``Dataset.num_classes``, or the largest label + 1);
    ``recorded``: the count in the run's ``config.json`` or the model's output size. Fewer classes is fine.
    """
    if found > recorded:
        raise DataError(
            f"{where}: the data has {found} classes but the run was built for {recorded}; the data gained classes since, "
            "so start a new run (another --out) or restore the original data"
        )


# ---------------------------------------------------------------- layouts and inputs


def builtin_layout(x: np.ndarray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """A built-in dataset's images, (N, H, W), (N, H, W, C) or (N, C, H, W), as (N, C, H, W) of exactly ``shape``."""
    c, h, w = shape
    if x.ndim == 3 and c == 1:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] == c and x.shape[1] != c:
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise DataError(f"{where}: images have shape {x.shape}, expected (N, {h}, {w}) or (N, {c}, {h}, {w})")
    return x


def user_layout(x: np.ndarray, where: str) -> np.ndarray:
    """A user array in one of the accepted layouts -> (N, D) or (N, C, H, W) (a view where possible)."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        channels_last = x.shape[-1] <= 4 < x.shape[1]
        return x.transpose(0, 3, 1, 2) if channels_last else x
    raise DataError(f"{where}: inputs have shape {x.shape}; expected (N, D), (N, H, W), (N, H, W, C) or (N, C, H, W)")


def input_tensor(x: np.ndarray, where: str) -> torch.Tensor:
    """uint8 kept as is; float checked finite and in [0, 1] and stored as float32. Always a writable copy or view."""
    if len(x) == 0:
        raise DataError(f"{where}: no examples")
    if x.dtype == np.uint8:
        arr = np.ascontiguousarray(x)
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: inputs must be uint8 (0-255) or float in [0, 1], got dtype {x.dtype}; convert them first")
    elif not np.isfinite(x).all():
        raise DataError(f"{where}: inputs contain NaN or infinite values; clean the data first")
    elif float(x.min()) < 0 or float(x.max()) > 1:
        lo, hi = float(x.min()), float(x.max())
        raise DataError(f"{where}: float inputs must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]; rescale them (e.g. min-max)")
    else:
        arr = np.ascontiguousarray(x, dtype=np.float32)
    # torch warns on a read-only array (a multi-line warning on stderr); a read-only input is copied instead.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


# ---------------------------------------------------------------- labels


def _label_array(y: np.ndarray, n: int, where: str) -> None:
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels have shape {y.shape}, expected ({n},) to match the inputs")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")


def builtin_labels(y: np.ndarray, n: int, num_classes: int, where: str) -> torch.Tensor:
    """A built-in dataset's labels: (n,) integers in 0..num_classes-1, as int64."""
    _label_array(y, n, where)
    if n and y.max() >= num_classes:
        raise DataError(f"{where}: labels must lie in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    return torch.from_numpy(y.astype(np.int64))


def user_class_count(y_train: np.ndarray, y_test: np.ndarray, n: tuple[int, int], where: str, k: int | None) -> int:
    """Validate both label arrays of the user's data (``n``: the train and test sizes); return the class count K.

    K is ``k`` (the number of class names) when given, else the largest training label + 1.
    """
    _label_array(y_train, n[0], f"{where} y_train")
    _label_array(y_test, n[1], f"{where} y_test")
    largest = int(max(y_train.max(), y_test.max() if len(y_test) else 0))
    check_class_limit(largest + 1, where)
    k = int(y_train.max()) + 1 if k is None else k
    if len(np.unique(y_train)) < 2:
        raise DataError(f"{where}: the training labels hold only one class; a classifier needs at least two")
    if largest >= k:
        raise DataError(f"{where}: labels must lie in 0..{k - 1} (the classes), found {largest}")
    return k


def class_name_tuple(names: np.ndarray, where: str) -> tuple[str, ...]:
    """An npz's ``class_names``: a 1-d array of str (or UTF-8 bytes), as a tuple of str."""
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{where}: class_names must be a 1-d array of strings, got {names.dtype} {names.shape}")
    if names.dtype.kind == "U":
        return tuple(str(n) for n in names)
    try:
        return tuple(bytes(n).decode("utf-8") for n in names)
    except UnicodeDecodeError:
        raise DataError(f"{where}: class_names holds bytes that are not UTF-8; save them as str") from None


# ---------------------------------------------------------------- items of a torch Dataset


def example_pair(item: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a torch Dataset's item or collated batch: a pair, or a dict with one input and one label key.

    Tuples and lists give their first two entries (extra entries are ignored); dicts need exactly one
    key of :data:`INPUT_KEYS` and one of :data:`LABEL_KEYS`. Anything else is a DataError.
    """
    if isinstance(item, Mapping):
        xs, ys = [k for k in INPUT_KEYS if k in item], [k for k in LABEL_KEYS if k in item]
        if len(xs) != 1 or len(ys) != 1:
            keys = ", ".join(sorted(map(str, item)))
            raise DataError(
                f"{what} yields dicts with keys [{keys}]; return (input, label) pairs from __getitem__, or use exactly one "
                f"input key ({', '.join(INPUT_KEYS)}) and one label key ({', '.join(LABEL_KEYS)})"
            )
        x, y = item[xs[0]], item[ys[0]]
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        x, y = item[0], item[1]
    else:
        raise DataError(f"{what} yields {type(item).__name__} items; each item must be an (input, label) pair")
    try:
        return torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{what}: an item is not made of tensors or arrays ({type(e).__name__}: {e}); yield tensors") from None
