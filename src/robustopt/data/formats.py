"""File formats, read without pickle and never beyond what a header justifies: ``.npz``, IDX and CIFAR binaries.

* ``.npz`` (:func:`read_npz`): a zip of ``.npy`` members ``x_train, y_train, x_test, y_test`` and
  optionally ``class_names``, as :func:`numpy.savez` writes. Members are read one by one with
  their ``.npy`` headers checked first; object arrays (they need pickle) and encrypted members are refused.
* IDX (:func:`read_idx`), raw or ``.gz``: ``00 00 08 ndim``, ndim big-endian uint32 dimensions, the bytes.
* CIFAR-10 binary (:func:`read_cifar_bin`): records ``<label byte><3072 planar RGB bytes>``;
  CIFAR-100 (:func:`read_cifar100_bin`): ``<coarse label><fine label><3072 bytes>``.

Every size a header declares is checked against the bytes really there, the machine's memory and
:func:`robustopt.data.validation.data_byte_limit` before anything is allocated. Arrays come back
writable (torch warns on read-only ones).
"""

from __future__ import annotations

import gzip
import math
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from robustopt.data.locations import shown
from robustopt.data.validation import check_data_bytes
from robustopt.errors import DataError, RobustoptError
from robustopt.files import MAX_DEFLATE_RATIO, check_declared_size, open_regular

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("class_names",)
NPY_MAGIC = b"\x93NUMPY"
_ZIP_ERRORS = (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``x_train, y_train, x_test, y_test`` (and ``class_names`` when present) of a dataset ``.npz``.

    Never unpickles and never allocates more than the file can hold: the members' uncompressed sizes
    (from the zip directory) are checked against the data limit before any is read, then each ``.npy``
    header's shape × itemsize against the bytes its member really holds.
    """
    where = shown(path)
    try:
        f, _ = open_regular(path)
    except OSError as e:
        raise DataError(f"{where}: cannot read this .npz dataset ({e.strerror or e})") from None
    with f:
        if f.read(6) == NPY_MAGIC:
            raise DataError(f"{where} is a single .npy array, not an .npz of x_train, y_train, x_test, y_test (numpy.savez)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as z:
                return _read_members(z, where)
        except RobustoptError:
            raise
        except _ZIP_ERRORS as e:
            raise DataError(f"{where}: not a readable .npz dataset ({type(e).__name__}: {e}); re-create or download it") from None


def _read_members(z: zipfile.ZipFile, where: str) -> dict[str, np.ndarray]:
    members = {name.removesuffix(".npy"): name for name in z.namelist()}
    missing = [k for k in ARRAY_KEYS if k not in members]
    if missing:
        raise DataError(f"{where}: missing arrays {', '.join(missing)} (need x_train, y_train, x_test, y_test)")
    infos = {k: z.getinfo(members[k]) for k in (*ARRAY_KEYS, *OPTIONAL_KEYS) if k in members}
    check_data_bytes(where, sum(i.file_size for i in infos.values()), "its arrays (uncompressed)")
    return {k: _read_member(z, info, where) for k, info in infos.items()}


def _npy_header(m: IO[bytes], where: str, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(m)
    if version not in ((1, 0), (2, 0)):
        raise DataError(f"{where}: member {name} uses .npy format version {version}; re-save it with numpy.savez")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(m)
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: array {name} declares a negative dimension {shape}; the file is corrupt")
    if dtype.hasobject:
        raise DataError(f"{where}: array {name} holds Python objects, which need pickle; robustopt never unpickles")
    return shape, fortran, dtype


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """One ``.npy`` member, its header checked against the member's real size, read into a fresh writable array."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise DataError(f"{where}: member {name} is encrypted; robustopt reads only plain .npz files (numpy.savez)")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 4096:
        raise DataError(f"{where}: member {name} claims {info.file_size} bytes from {info.compress_size} compressed; corrupt")
    with z.open(info) as m:
        shape, fortran, dtype = _npy_header(m, where, name)
        nbytes = math.prod(shape) * dtype.itemsize
        check_declared_size(where, nbytes, info.file_size - m.tell(), f"array {name} of shape {shape}")
        out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        got = _read_into(m, out.ravel(order="A").view(np.uint8)) if nbytes else 0
    if got != nbytes:
        raise DataError(f"{where}: array {name} is truncated ({got} of {nbytes} bytes)")
    return out


def _read_into(stream: IO[bytes], buffer: np.ndarray) -> int:
    """Fill the uint8 view ``buffer`` from ``stream``; the number of bytes read (less at end of stream)."""
    view, pos = memoryview(buffer), 0
    while pos < len(view):
        n = stream.readinto(view[pos:])  # type: ignore[attr-defined]
        if not n:
            break
        pos += n
    return pos


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (raw or gzip), as used by MNIST and Fashion-MNIST, as a writable uint8 array.

    The data size the header declares is checked against what the file can hold and the data limit before it is read.
    """
    where = shown(path)
    try:
        f, size = open_regular(path)
    except OSError as e:
        raise DataError(f"{where}: cannot read IDX file ({e.strerror or e}); re-download it") from None
    gz = path.suffix == ".gz"
    with f:
        try:
            stream = gzip.GzipFile(fileobj=f) if gz else f
            dims = _idx_dims(stream, where)
            count, header = math.prod(dims), 4 + 4 * len(dims)
            check_declared_size(where, count, (MAX_DEFLATE_RATIO * size if gz else size) - header, f"IDX dimensions {dims}")
            check_data_bytes(where, count, f"IDX dimensions {dims}")
            out = np.empty(dims, dtype=np.uint8)
            got = _read_into(stream, out.reshape(-1)) if count else 0
            extra = stream.read(1)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{where}: cannot read IDX file ({e}); re-download it") from None
    if got != count or extra:
        held = f"{got}{'+' if extra else ''}"
        raise DataError(f"{where}: IDX file has {held} data bytes, header says {count}; it is truncated or corrupt")
    return out


def _idx_dims(stream: IO[bytes], where: str) -> list[int]:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
        raise DataError(f"{where}: not an unsigned-byte IDX file (bad magic number)")
    raw_dims = stream.read(4 * magic[3])
    if len(raw_dims) < 4 * magic[3]:
        raise DataError(f"{where}: truncated IDX header")
    return [int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, len(raw_dims), 4)]


def _cifar_records(paths: list[Path], label_bytes: int, dataset: str) -> np.ndarray:
    """The fixed-size records ``<label_bytes label bytes><3072 planar RGB bytes>`` of CIFAR binary files, (N, L + 3072).

    Only regular files are read (a FIFO or a link to /dev/zero is refused), each checked to hold whole records.
    """
    record, name = label_bytes + 3072, {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
    chunks, total = [], 0
    for p in paths:
        try:
            f, size = open_regular(p)
        except OSError as e:
            hint = f"run `robustopt download {dataset}`"
            raise DataError(f"{shown(p)}: cannot read this {name} file ({e.strerror}); {hint}") from None
        with f:
            if size == 0 or size % record:
                raise DataError(f"{shown(p)}: size {size} is not a multiple of {record} bytes; the file is truncated or corrupt")
            total += size
            check_data_bytes(shown(p), total, f"the {name} files")
            out = np.empty((size // record, record), dtype=np.uint8)
            if _read_into(f, out.reshape(-1)) != size:
                raise DataError(f"{shown(p)}: the file shrank while it was read; try again")
            chunks.append(out)
    return np.concatenate(chunks)


def read_cifar_bin(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records ``<label byte><3072 planar RGB bytes>`` -> (N, 3, 32, 32), (N,)."""
    rec = _cifar_records(paths, 1, "cifar10")
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0]


def read_cifar100_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 binary records ``<coarse label><fine label><3072 planar RGB bytes>`` -> (N, 3, 32, 32), fine labels (N,)."""
    rec = _cifar_records([path], 2, "cifar100")
    return rec[:, 2:].reshape(-1, 3, 32, 32), rec[:, 1]
