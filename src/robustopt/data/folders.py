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
(3 channels) otherwise, with alpha dropped. 16-bit grayscale images are scaled to 8 bits
(v ↦ round(255·v / 65535)), never clipped. Each image's width × height is checked from its header
against :data:`~robustopt.data.validation.MAX_IMAGE_PIXELS`, and the whole decoded folder against
the data limit, before any pixel is decoded. Class folder names must be valid UTF-8.

**The cache.** The decoded arrays are cached in ``<user cache>/folders/<key>.npz``, where the user
cache is ``$XDG_CACHE_HOME/robustopt`` (``~/.cache/robustopt`` by default; see
:func:`robustopt.data.locations.cache_dir`). The file is written atomically and read without
pickle (and checked against the folder's listing). The key hashes the folder's resolved root and,
for every image, its split, label, relative path, size, modification time and the sha256 of its
bytes: another folder, or any edited, added, removed or renamed image, decodes again. Deleting
the cache is always safe.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from robustopt.data.formats import read_npz
from robustopt.data.locations import cache_dir, shown
from robustopt.data.validation import MAX_IMAGE_PIXELS, check_data_bytes, check_image_pixels
from robustopt.errors import DataError, RobustoptError
from robustopt.files import open_regular

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # Pillow's modes for 16-bit grayscale
GRAY_MODES = frozenset({"1", "L", "LA", "La", "F"}) | SIXTEEN_BIT_MODES
TEST_EVERY = 10  # the hash split sends about 1 image in TEST_EVERY to the test set
_CACHE_VERSION = "folders-v2"  # change when the cached arrays' meaning or the key changes

Listing = dict[str, list[tuple[Path, int]]]  # split -> [(file, label)]


def _images_in(directory: Path) -> list[Path]:
    files = (p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    return sorted(p for p in files if p.is_file())


def _class_dirs(directory: Path) -> dict[str, Path]:
    dirs = {p.name: p for p in sorted(directory.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    for name, d in dirs.items():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{shown(d)}: the class folder's name is not valid UTF-8; rename it (it is a class name)") from None
    return dirs


def _is_test(class_name: str, file_name: str) -> bool:
    digest = hashlib.sha256(os.fsencode(f"{class_name}/{file_name}")).hexdigest()  # fsencode: any file name hashes
    return int(digest[:8], 16) % TEST_EVERY == 0


def list_folder(root: Path) -> tuple[Listing, tuple[str, ...]]:
    """The image files of each split with their labels, and the class names; DataError for a bad layout."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / d for d in ("test", "val") if train_dir != root and (root / d).is_dir()), None)
    classes = _class_dirs(train_dir)
    layout = "ROOT/CLASS/*.png or ROOT/train/CLASS/*.png + ROOT/test/CLASS/*.png"
    if not classes:
        raise DataError(f"{shown(train_dir)}: no class subfolders; expected {layout}")
    if len(classes) < 2:
        raise DataError(f"{shown(train_dir)}: only one class folder ({next(iter(classes))}); a classifier needs at least two")
    names = tuple(classes)
    listing: Listing = {"train": [], "test": []}
    for label, (cls, d) in enumerate(classes.items()):
        files = _images_in(d)
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"{shown(d)}: class folder has no images ({suffixes}); add images or remove it")
        for f in files:
            listing["test" if test_dir is None and _is_test(cls, f.name) else "train"].append((f, label))
    if test_dir is not None:
        for cls, d in _class_dirs(test_dir).items():
            if cls not in classes:
                raise DataError(f"{shown(d)}: test class {cls!r} is not a training class folder ({', '.join(names)})")
            listing["test"] += [(f, names.index(cls)) for f in _images_in(d)]
    for split in ("train", "test"):
        if not listing[split]:
            hint = f"add more (the hash split sends ~1 in {TEST_EVERY} to test)"
            raise DataError(f"{shown(root)}: the {split} split is empty; {hint}")
    return listing, names


def _file_digest(path: Path) -> tuple[int, int, str]:
    """(size, mtime in ns, sha256 of the bytes) of a regular file."""
    try:
        f, _ = open_regular(path)
    except (OSError, RobustoptError) as e:
        raise DataError(f"{shown(path)}: cannot read this image ({getattr(e, 'strerror', None) or e})") from None
    with f:
        st = os.fstat(f.fileno())
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return st.st_size, st.st_mtime_ns, h.hexdigest()


def cache_key(root: Path, listing: Listing) -> str:
    """sha256 over the resolved root and every image's split, label, relative path, size, mtime and content hash."""
    h = hashlib.sha256(_CACHE_VERSION.encode())
    h.update(os.fsencode(root.resolve()) + b"\0")
    for split in ("train", "test"):
        for f, label in listing[split]:
            size, mtime, digest = _file_digest(f)
            rel = os.fsencode(f.relative_to(root).as_posix())
            h.update(f"{split}\0{label}\0".encode() + rel + f"\0{size}\0{mtime}\0{digest}\n".encode())
    return h.hexdigest()


def _open_image(path: Path):  # noqa: ANN202 - a PIL.Image.Image; Pillow is imported only for folders
    """Open (header only) with Pillow's decompression-bomb warning raised as an error, so nothing prints."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _probe(files: list[Path]) -> tuple[tuple[int, int], int]:
    """(width, height) shared by all images and the channel count (1 if all are grayscale, else 3), from headers only."""
    from PIL import Image

    size, gray = None, True
    for f in files:
        try:
            with _open_image(f) as im:
                im_size, mode = im.size, im.mode
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:  # Pillow's own, larger limit
            raise DataError(f"{shown(f)}: image too large ({e}); the limit is {MAX_IMAGE_PIXELS:,} pixels, resize it") from None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ...) on bad files
            raise DataError(f"{shown(f)}: not a readable image ({type(e).__name__}: {e}); remove or replace it") from None
        check_image_pixels(shown(f), *im_size)
        if size is None:
            size = im_size
        elif im_size != size:
            first = f"the first image is {size[0]}×{size[1]}"
            raise DataError(f"{shown(f)}: image is {im_size[0]}×{im_size[1]}, {first}; resize all alike")
        gray = gray and mode in GRAY_MODES
    assert size is not None  # list_folder guarantees images
    return size, 1 if gray else 3


def _gray8(a: np.ndarray, mode: str, where: str) -> np.ndarray:
    """A 16-bit (or float) grayscale image (H, W) as uint8: v ↦ round(255·v / 65535) (float: round(255·v))."""
    if mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise DataError(f"{where}: a float image must lie in [0, 1]; save it as 8- or 16-bit")
        return np.rint(a * 255).astype(np.uint8)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{where}: a 32-bit integer image with values outside 0..65535; save it as 8- or 16-bit")
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _pixels(im, channels: int, where: str) -> np.ndarray:  # noqa: ANN001 - a PIL.Image.Image
    """uint8 (H, W) for channels 1, (H, W, 3) for 3. 16-bit and float grayscale are scaled, not clipped."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "F":
        gray = _gray8(np.asarray(im), im.mode, where)
        return gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def decode(files: list[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode ``files`` into uint8 (N, C, H, W)."""
    w, h = size
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with _open_image(f) as im:
                if im.size != size:
                    raise DataError(f"{shown(f)}: image changed size while the folder was read; try again")
                pixels = _pixels(im, channels, shown(f))
        except RobustoptError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on corrupt data
            raise DataError(f"{shown(f)}: cannot decode image ({type(e).__name__}: {e}); remove or replace it") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


def _read_cache(path: Path, listing: Listing, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays when they exist and agree with the listing (counts, labels, class names); else None."""
    if not path.is_file():
        return None
    try:
        arrays = read_npz(path)
    except RobustoptError:  # damaged or edited: decode again
        return None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        labels = np.array([label for _, label in listing[split]], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(labels) or not np.array_equal(y, labels):
            return None
    cached_names = arrays.get("class_names")
    if cached_names is None or cached_names.dtype.kind != "U" or tuple(cached_names.tolist()) != names:
        return None
    return arrays


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
    """x_train, y_train, x_test, y_test (uint8 (N, C, H, W), int64) and the class names of an image folder.

    Served from the cache (see the module docstring) when the folder's root and every image's bytes are unchanged.
    """
    listing, names = list_folder(root)
    cached = cache_dir() / "folders" / f"{cache_key(root, listing)[:32]}.npz"
    arrays = _read_cache(cached, listing, names)
    if arrays is None:
        size, channels = _probe([f for split in ("train", "test") for f, _ in listing[split]])
        n = len(listing["train"]) + len(listing["test"])
        check_data_bytes(shown(root), n * channels * size[0] * size[1], f"{n} images of {channels}×{size[1]}×{size[0]}")
        arrays = {f"x_{s}": decode([f for f, _ in listing[s]], size, channels) for s in ("train", "test")}
        arrays |= {f"y_{s}": np.array([label for _, label in listing[s]], dtype=np.int64) for s in ("train", "test")}
        arrays["class_names"] = np.array(names)
        _write_cache(cached, arrays)
    arrays.pop("class_names", None)
    return arrays, names
