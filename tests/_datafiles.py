"""Writers for tiny synthetic dataset files in every format robustopt reads (test helpers).

The arrays are small (a few dozen images) so that every format can be written, read back and
corrupted in milliseconds. Layouts follow the formats' specifications:

* IDX: 3 zero/type bytes (``00 00 08`` = unsigned byte), the number of dimensions, each
  dimension as a big-endian uint32, then the data in C order;
* CIFAR-10 binary: records of one label byte and 3072 image bytes (R, G, B planes of 32×32);
* npz: ``x_train, y_train, x_test, y_test`` written by :func:`numpy.savez`.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

IDX_STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def tiny_arrays(shape: tuple[int, ...] = (28, 28), n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 images of ``shape`` per example and int labels in 0..9."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.int64),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy must not append ".npz" to odd names
        np.savez(f, **arrays)
    return path


def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX encoding of ``arr``."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_idx(directory: Path, arrays: dict[str, np.ndarray], gz: bool) -> dict[str, Path]:
    """The four IDX files of ``arrays`` in ``directory`` (gzip-compressed when ``gz``)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, stem in IDX_STEMS.items():
        raw = idx_bytes(arrays[key].astype(np.uint8))
        path = directory / (f"{stem}.gz" if gz else stem)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        out[key] = path
    return out


def cifar_records(x_nhwc: np.ndarray, y: np.ndarray) -> bytes:
    """CIFAR-10 binary records from NHWC uint8 images and labels."""
    planar = x_nhwc.transpose(0, 3, 1, 2).reshape(len(y), -1)
    return np.concatenate([y.astype(np.uint8)[:, None], planar], axis=1).tobytes()


def write_cifar_bin(directory: Path, arrays: dict[str, np.ndarray], batches: int = 5) -> Path:
    """``data_batch_{1..5}.bin`` (training images split evenly) and ``test_batch.bin``."""
    directory.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(arrays["y_train"])), batches)
    for i, idx in enumerate(parts, start=1):
        (directory / f"data_batch_{i}.bin").write_bytes(cifar_records(arrays["x_train"][idx], arrays["y_train"][idx]))
    (directory / "test_batch.bin").write_bytes(cifar_records(arrays["x_test"], arrays["y_test"]))
    return directory


def cifar100_records(x_nhwc: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> bytes:
    """CIFAR-100 binary records: coarse label byte, fine label byte, then the R, G, B planes."""
    planar = x_nhwc.transpose(0, 3, 1, 2).reshape(len(fine), -1)
    return np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], planar], axis=1).tobytes()


def write_cifar100_bin(directory: Path, arrays: dict[str, np.ndarray], names: list[str] | None = None) -> Path:
    """``train.bin``, ``test.bin`` (coarse label = fine // 5, as CIFAR-100's 20 superclasses of 5) and label names."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, stem in (("train", "train"), ("test", "test")):
        y = arrays[f"y_{split}"]
        (directory / f"{stem}.bin").write_bytes(cifar100_records(arrays[f"x_{split}"], y, y // 5))
    if names is not None:
        (directory / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    return directory


def write_image_folder(root: Path, images: dict[str, list[np.ndarray]], ext: str = ".png") -> dict[str, list[Path]]:
    """``root/CLASS/NNN.ext`` for each class's uint8 (H, W) or (H, W, C) images, written with Pillow."""
    from PIL import Image

    out: dict[str, list[Path]] = {}
    for cls, imgs in images.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        out[cls] = []
        for i, img in enumerate(imgs):
            path = root / cls / f"{i:03d}{ext}"
            Image.fromarray(img).save(path)
            out[cls].append(path)
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width``×``height`` 8-bit grayscale, with no pixel data: it can be probed, not decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def write_zip_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> Path:
    """An ``.npz`` written member by member with zipfile (no zip64 fields), so its headers can be patched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            z.writestr(f"{name}.npy", buf.getvalue())
    return path


def patch_zip_member(path: Path, member: str, *, file_size: int | None = None, encrypted: bool = False) -> Path:
    """Rewrite a member's declared uncompressed size and/or set its "encrypted" flag in both zip headers."""
    raw, name, pos = bytearray(path.read_bytes()), member.encode(), 0
    while (pos := raw.find(b"PK\x01\x02", pos)) != -1:
        n = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + n] == name:
            local = struct.unpack_from("<I", raw, pos + 42)[0]
            if file_size is not None:
                struct.pack_into("<I", raw, pos + 24, file_size)
                struct.pack_into("<I", raw, local + 22, file_size)
            if encrypted:
                raw[pos + 8] |= 1
                raw[local + 6] |= 1
        pos += 4
    path.write_bytes(bytes(raw))
    return path
