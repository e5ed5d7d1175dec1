"""Datasets: MNIST (bundled), Fashion-MNIST, CIFAR-10 and CIFAR-100, and the user's own files, loaded without pickle.

Lookup order for files that are not bundled: ``--data-dir``, ``$ROBUSTOPT_DATA``, the user
cache (``$XDG_CACHE_HOME/robustopt`` or ``~/.cache/robustopt``), then for Fashion-MNIST the
files of Debian's ``dataset-fashion-mnist`` package. Formats: ``NAME.npz`` with ``x_train,
y_train, x_test, y_test`` (as in ``shared/data``), IDX files (raw or ``.gz``) and CIFAR-10's
binary version (CIFAR-100: ``train.bin``/``test.bin``, fine labels). Nothing is ever downloaded
implicitly: see :mod:`robustopt.data.download`. A path to an ``.npz`` file or an image folder
instead of a name loads the user's data (:mod:`robustopt.data.user`).

Images are kept as uint8 (N, C, H, W) and converted to float [0, 1] per batch.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from robustopt.errors import DataError, RobustoptError
from robustopt.files import MAX_DEFLATE_RATIO, check_declared_size, open_regular

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
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Dataset:
    """A classification dataset in memory.

    x: uint8 or float in [0, 1], images (N, C, H, W) or feature vectors (N, D); y: int64 (N,) in
    0..num_classes-1. ``mean``/``std`` are the training data's per-channel (per-feature) statistics
    the built-in nets normalise with. ``name`` is a built-in name or the data's absolute path (so
    ``load_dataset(name)`` reloads it); ``kind`` is the built-in name, ``"npz"`` or ``"folder"``
    (it picks the augmentation default, :func:`robustopt.data.augment.default_augment`);
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


def cache_dir() -> Path:
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundled_mnist_path() -> Path:
    return Path(str(resources.files("robustopt") / "_data" / "mnist.npz"))


# ---------------------------------------------------------------- file formats


NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of a dataset ``.npz``; never unpickles, never allocates more than the file can hold.

    The archive is read member by member: each ``.npy`` header's shape × itemsize must match the
    bytes the member really holds (and fit in memory) before they are read, so a header declaring
    10⁹ images is an error, not an allocation. Arrays of Python objects are refused (they need pickle).
    """
    try:
        f, _ = open_regular(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read this .npz dataset ({e.strerror or e})") from None
    with f:
        if f.read(6) == NPY_MAGIC:
            raise DataError(f"{path} is a single .npy array, not an .npz of x_train, y_train, x_test, y_test (numpy.savez)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as z:
                members = {name.removesuffix(".npy"): name for name in z.namelist()}
                missing = [k for k in IDX_NAMES if k not in members]
                if missing:
                    raise DataError(f"{path}: missing arrays {', '.join(missing)} (need x_train, y_train, x_test, y_test)")
                return {k: _read_member(z, members[k], path) for k in IDX_NAMES}
        except RobustoptError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
            raise DataError(f"{path}: not a readable .npz dataset ({type(e).__name__}: {e}); re-create or download it") from None


def _read_member(z: zipfile.ZipFile, name: str, path: Path) -> np.ndarray:
    """One ``.npy`` member of an open archive, its header checked against the member's real size first."""
    info = z.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 4096:
        raise DataError(f"{path}: member {name} claims {info.file_size} bytes from {info.compress_size} compressed; corrupt")
    with z.open(info) as m:
        version = np.lib.format.read_magic(m)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{path}: member {name} uses .npy format version {version}; re-save it with numpy.savez")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(m)
        if any(d < 0 for d in shape):
            raise DataError(f"{path}: array {name} declares a negative dimension {shape}; the file is corrupt")
        if dtype.hasobject:
            raise DataError(f"{path}: array {name} holds Python objects, which need pickle; robustopt never unpickles")
        nbytes = math.prod(shape) * dtype.itemsize
        check_declared_size(path, nbytes, info.file_size - m.tell(), f"array {name} of shape {shape}")
        data = m.read(nbytes)
    if len(data) != nbytes:
        raise DataError(f"{path}: array {name} is truncated ({len(data)} of {nbytes} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (raw or gzip), as used by MNIST and Fashion-MNIST.

    Layout: ``00 00 08 ndim``, ndim big-endian uint32 dimensions, then the bytes. The data size the
    header declares is checked against what the file can hold before it is read.
    """
    try:
        f, size = open_regular(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e}); re-download it") from None
    gz = path.suffix == ".gz"
    with f:
        try:
            stream = gzip.GzipFile(fileobj=f) if gz else f
            magic = stream.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
                raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
            raw_dims = stream.read(4 * magic[3])
            if len(raw_dims) < 4 * magic[3]:
                raise DataError(f"{path}: truncated IDX header")
            dims = [int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, len(raw_dims), 4)]
            count, header = math.prod(dims), 4 + len(raw_dims)
            check_declared_size(path, count, (MAX_DEFLATE_RATIO * size if gz else size) - header, f"IDX dimensions {dims}")
            data = stream.read(count)
            extra = stream.read(1)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read IDX file ({e}); re-download it") from None
    if len(data) != count or extra:
        held = f"{len(data)}{'+' if extra else ''}"
        raise DataError(f"{path}: IDX file has {held} data bytes, header says {count}; it is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _cifar_records(paths: list[Path], label_bytes: int, dataset: str) -> np.ndarray:
    """The fixed-size records ``<label_bytes label bytes><3072 planar RGB bytes>`` of CIFAR binary files, (N, L + 3072).

    Only regular files are read (a FIFO or a link to /dev/zero is refused), each checked to hold whole records.
    """
    record, name = label_bytes + 3072, {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
    chunks = []
    for p in paths:
        try:
            f, size = open_regular(p)
        except OSError as e:
            raise DataError(f"{p}: cannot read this {name} file ({e.strerror}); run `robustopt download {dataset}`") from None
        with f:
            if size == 0 or size % record:
                raise DataError(f"{p}: size {size} is not a multiple of {record} bytes; the file is truncated or corrupt")
            check_declared_size(p, size, size, f"this {name} file")
            chunks.append(np.frombuffer(f.read(size), dtype=np.uint8).reshape(-1, record))
    return np.concatenate(chunks)


def read_cifar_bin(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records ``<label byte><3072 planar RGB bytes>`` -> (N, 3, 32, 32), (N,)."""
    rec = _cifar_records(paths, 1, "cifar10")
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0]


def read_cifar100_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 binary records ``<coarse label><fine label><3072 planar RGB bytes>`` -> (N, 3, 32, 32), fine labels (N,)."""
    rec = _cifar_records([path], 2, "cifar100")
    return rec[:, 2:].reshape(-1, 3, 32, 32), rec[:, 1]


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


def _find_idx(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_NAMES.items():
        for cand in (directory / stem, directory / f"{stem}.gz"):
            if cand.exists():
                found[key] = cand
                break
    return found if len(found) == 4 else None


def _locate(name: str, data_dir: str | Path | None) -> dict[str, np.ndarray] | None:
    """Search the lookup directories for ``name`` in any supported format."""
    dirs = search_dirs(data_dir)
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION.parent)
    for d in dirs:
        npz = d / f"{name.replace('-', '_')}.npz"
        npz_dash = d / f"{name}.npz"
        for cand in (npz_dash, npz):
            if cand.exists():  # not is_file(): a FIFO or device by that name is an error, not silently skipped
                return read_npz(cand)
        sub = d / name
        if name == "cifar100":
            found = _find_cifar100(d)
            if found is not None:
                return found
            continue
        if name == "cifar10":
            bdir = next((p for p in (d / "cifar-10-batches-bin", sub) if (p / "test_batch.bin").exists()), None)
            if bdir is not None:
                xtr, ytr = read_cifar_bin([bdir / f"data_batch_{i}.bin" for i in range(1, 6)])
                xte, yte = read_cifar_bin([bdir / "test_batch.bin"])
                return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
        else:
            idx = _find_idx(sub) or _find_idx(d)
            if idx is not None:
                return {k: read_idx(p) for k, p in idx.items()}
    return None


# ---------------------------------------------------------------- validation


def _as_nchw(x: np.ndarray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    c, h, w = shape
    if x.ndim == 3 and c == 1:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] == c and x.shape[1] != c:
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise DataError(f"{where}: images have shape {x.shape}, expected (N, {h}, {w}) or (N, {c}, {h}, {w})")
    return np.ascontiguousarray(x)


def _check_images(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype == np.uint8:
        return torch.from_numpy(x.copy())
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or infinite pixels; clean the data first")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{where}: float images must lie in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]")
    return torch.from_numpy(x.astype(np.float32))


def _check_labels(y: np.ndarray, n: int, num_classes: int, where: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels have shape {y.shape}, expected ({n},) to match the images")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: labels must lie in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    return torch.from_numpy(y.astype(np.int64))


def from_arrays(name: str, arrays: dict[str, np.ndarray], where: str = "dataset") -> Dataset:
    """Validate raw arrays and build a :class:`Dataset`."""
    shape, (mean, std), k = SHAPES[name], STATS[name], NUM_CLASSES[name]
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        x = _as_nchw(arrays[f"x_{split}"], shape, f"{where} x_{split}")
        if len(x) == 0:
            raise DataError(f"{where}: x_{split} is empty")
        out[f"x_{split}"] = _check_images(x, f"{where} x_{split}")
        out[f"y_{split}"] = _check_labels(arrays[f"y_{split}"], len(x), k, f"{where} y_{split}")
    names = tuple(str(c) for c in arrays["class_names"]) if "class_names" in arrays else None
    return Dataset(name, out["x_train"], out["y_train"], out["x_test"], out["y_test"], mean, std, k, names)


def looks_like_path(name: str | Path) -> bool:
    """True for what can only be a path (a Path, a separator, an ``.npz`` suffix) or an existing file or folder."""
    text = str(name)
    return isinstance(name, Path) or os.sep in text or "/" in text or text.endswith(".npz") or Path(text).exists()


def load_dataset(name: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """Load ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, or the user's data at a path.

    MNIST is bundled (its sha256 is verified on every load); the others are searched for
    (see the module docstring) and a clear error says how to get them when missing. A path to an
    ``.npz`` with ``x_train, y_train, x_test, y_test`` or to an image folder loads that data
    (``data_dir`` is then not used); see :func:`robustopt.data.user.load_user_data`. A built-in
    name wins over a same-named folder in the current directory: write ``./mnist`` for the folder.
    """
    if name not in STATS and looks_like_path(name):
        from robustopt.data.user import load_user_data  # local: user.py builds on this module

        return load_user_data(Path(name))
    if name not in STATS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or a path to an .npz or image folder")
    if name == "mnist":
        arrays = _locate(name, data_dir) if data_dir else None
        if arrays is None:
            path = bundled_mnist_path()
            if not path.is_file():
                raise DataError(f"bundled MNIST is missing at {path}; reinstall robustopt")
            if sha256_file(path) != MNIST_SHA256:
                raise DataError(f"bundled MNIST at {path} fails its sha256 check; reinstall robustopt")
            arrays = read_npz(path)
        return from_arrays(name, arrays, "mnist")
    arrays = _locate(name, data_dir)
    if arrays is None:
        looked = ", ".join(str(d) for d in search_dirs(data_dir))
        hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise DataError(
            f"dataset {name!r} not found (looked in {looked}); run `robustopt download {name}`{hint}, or pass --data-dir"
        )
    return from_arrays(name, arrays, name)
