"""Image folders in the one-subfolder-per-class layout, decoded once with Pillow and cached as uint8.

Layouts (class names are the subfolder names, sorted; label k is the k-th name):

* ``ROOT/train/CLASS/*.png`` and ``ROOT/test/CLASS/*.png`` (``val/`` is accepted for ``test/``):
  the given split. Every test class must also be a training class.
* ``ROOT/CLASS/*.png`` (or ``ROOT/train/`` alone): a deterministic 90/10 split. An image is a
  test image when the first 8 hex digits of sha256(``"CLASS/FILENAME"``) are ≡ 0 (mod 10), so
  each image's side depends only on its own name: adding images never moves the others, and
  every machine gets the same split.

Files with the suffixes in :data:`IMAGE_SUFFIXES` are images (others, and hidden files, are
ignored). All images must have the same width and height (nothing is resized: resizing changes
what an ε-ball means); they become grayscale (1 channel) when every image is grayscale and RGB
(3 channels) otherwise, with alpha dropped.

The decoded arrays are cached in ``<user cache>/folders/<key>.npz`` (written atomically, read
without pickle), where the key hashes every image's relative path, size and modification time:
touching, adding or removing an image decodes the folder again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from robustopt.data.datasets import cache_dir
from robustopt.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
TEST_EVERY = 10  # the hash split sends about 1 image in TEST_EVERY to the test set
_CACHE_VERSION = "folders-v1"  # change when the cached arrays' meaning changes

Listing = dict[str, list[tuple[Path, int]]]  # split -> [(file, label)]


def _images_in(directory: Path) -> list[Path]:
    files = (p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    return sorted(p for p in files if p.is_file())


def _class_dirs(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _is_test(class_name: str, file_name: str) -> bool:
    digest = hashlib.sha256(f"{class_name}/{file_name}".encode()).hexdigest()
    return int(digest[:8], 16) % TEST_EVERY == 0


def list_folder(root: Path) -> tuple[Listing, tuple[str, ...]]:
    """The image files of each split with their labels, and the class names; DataError for a bad layout."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / d for d in ("test", "val") if train_dir != root and (root / d).is_dir()), None)
    classes = _class_dirs(train_dir)
    layout = "ROOT/CLASS/*.png or ROOT/train/CLASS/*.png + ROOT/test/CLASS/*.png"
    if not classes:
        raise DataError(f"{train_dir}: no class subfolders; expected {layout}")
    if len(classes) < 2:
        raise DataError(f"{train_dir}: only one class folder ({next(iter(classes))}); a classifier needs at least two")
    names = tuple(classes)
    listing: Listing = {"train": [], "test": []}
    for label, (cls, d) in enumerate(classes.items()):
        files = _images_in(d)
        if not files:
            raise DataError(f"{d}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove it")
        for f in files:
            listing["test" if test_dir is None and _is_test(cls, f.name) else "train"].append((f, label))
    if test_dir is not None:
        for cls, d in _class_dirs(test_dir).items():
            if cls not in classes:
                raise DataError(f"{d}: test class {cls!r} is not a training class folder ({', '.join(names)})")
            listing["test"] += [(f, names.index(cls)) for f in _images_in(d)]
    for split in ("train", "test"):
        if not listing[split]:
            raise DataError(f"{root}: the {split} split is empty; add more (the hash split sends ~1 in {TEST_EVERY} to test)")
    return listing, names


def cache_key(root: Path, listing: Listing) -> str:
    """sha256 over every image's split, label, path relative to ``root``, size and mtime."""
    h = hashlib.sha256(_CACHE_VERSION.encode())
    for split in ("train", "test"):
        for f, label in listing[split]:
            st = f.stat()
            h.update(f"{split}\0{label}\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _probe(files: list[Path]) -> tuple[tuple[int, int], int]:
    """(width, height) shared by all images and the channel count (1 if all are grayscale, else 3), from headers only."""
    from PIL import Image, UnidentifiedImageError

    size, gray = None, True
    for f in files:
        try:
            with Image.open(f) as im:
                im_size, mode = im.size, im.mode
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: not a readable image ({type(e).__name__}: {e}); remove or replace it") from None
        if size is None:
            size = im_size
        elif im_size != size:
            raise DataError(f"{f}: image is {im_size[0]}×{im_size[1]}, the first image is {size[0]}×{size[1]}; resize all alike")
        gray = gray and mode in GRAY_MODES
    assert size is not None  # list_folder guarantees images
    return size, 1 if gray else 3


def decode(files: list[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode ``files`` into uint8 (N, C, H, W)."""
    from PIL import Image

    w, h = size
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: cannot decode image ({type(e).__name__}: {e}); remove or replace it") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "class_names")}
    except (OSError, ValueError, KeyError, EOFError):  # missing or damaged: decode again
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic: a temporary file in the same folder, renamed into place; a read-only cache is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, path)
    except OSError:
        return


def read_image_folder(root: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """x_train, y_train, x_test, y_test (uint8 (N, C, H, W), int64) and the class names of an image folder."""
    listing, names = list_folder(root)
    cached = cache_dir() / "folders" / f"{cache_key(root, listing)[:32]}.npz"
    arrays = _read_cache(cached)
    if arrays is None:
        size, channels = _probe([f for split in ("train", "test") for f, _ in listing[split]])
        arrays = {f"x_{s}": decode([f for f, _ in listing[s]], size, channels) for s in ("train", "test")}
        arrays |= {f"y_{s}": np.array([label for _, label in listing[s]], dtype=np.int64) for s in ("train", "test")}
        arrays["class_names"] = np.array(names)
        _write_cache(cached, arrays)
    arrays.pop("class_names", None)
    return arrays, names
