"""Resource bombs end in one clear DataError before anything big is allocated: npz members, image pixels, class counts.

The limits are stated in :mod:`robustopt.data.validation`: 2 GiB of arrays per dataset (``$ROBUSTOPT_MAX_DATA_BYTES``),
4096×4096 pixels per image, 100,000 classes. Every bomb here is a small file that only *claims* a huge payload, so
each test runs in milliseconds; a test that really allocated would fail by MemoryError or be slow, not pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _datafiles import (
    patch_zip_member,
    png_header_only,
    tiny_arrays,
    write_cifar_bin,
    write_idx,
    write_image_folder,
    write_npz,
    write_zip_npz,
)
from robustopt.data import folders
from robustopt.data.datasets import load_dataset
from robustopt.data.validation import LIMIT_ENV, MAX_CLASSES, MAX_DATA_BYTES, MAX_IMAGE_PIXELS
from robustopt.errors import DataError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTOPT_DATA", raising=False)
    monkeypatch.delenv(LIMIT_ENV, raising=False)


def _one_line_error(path: str | Path, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_the_stated_limits() -> None:
    assert MAX_DATA_BYTES == 2 * 2**30 and MAX_IMAGE_PIXELS == 4096 * 4096 and MAX_CLASSES == 100_000


def test_a_3_mb_npz_that_claims_3_gib_is_refused_from_the_zip_header(tmp_path: Path) -> None:
    """The issue's bomb: ~3 MB compressed, 3 GiB declared. Refused from the zip directory, before any member is read."""
    arrays = {**tiny_arrays((7,)), "x_train": np.random.default_rng(0).integers(0, 256, (3 << 20,), dtype=np.uint8)}
    path = patch_zip_member(write_zip_npz(tmp_path / "bomb.npz", arrays), "x_train.npy", file_size=3 << 30)
    assert path.stat().st_size < 4 << 20
    message = _one_line_error(path, r"would take 3 GiB, more than the 2 GiB limit .*ROBUSTOPT_MAX_DATA_BYTES")
    assert str(path) in message


def test_a_real_deflate_bomb_over_a_lowered_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = {**tiny_arrays((7,)), "x_train": np.zeros((4 << 20,), np.uint8)}  # 4 MiB of zeros deflate to ~4 KiB
    path = write_zip_npz(tmp_path / "zeros.npz", arrays)
    assert path.stat().st_size < 64 << 10
    monkeypatch.setenv(LIMIT_ENV, str(1 << 20))
    _one_line_error(path, "more than the 0.000977 GiB limit")
    monkeypatch.setenv(LIMIT_ENV, "lots")
    _one_line_error(path, "ROBUSTOPT_MAX_DATA_BYTES must be a positive number of bytes, got 'lots'")


def test_the_limit_also_guards_idx_and_cifar_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx(tmp_path / "fashion-mnist", tiny_arrays(), gz=True)
    write_cifar_bin(tmp_path / "cifar-10-batches-bin", tiny_arrays((32, 32, 3)))
    monkeypatch.setenv(LIMIT_ENV, "10000")  # below 30 images of 28×28 (23,520 bytes) and CIFAR's 6 records per file
    with pytest.raises(DataError, match="IDX dimensions .* more than the"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(DataError, match="the CIFAR-10 files would take .* more than the"):
        load_dataset("cifar10", data_dir=tmp_path)
    monkeypatch.delenv(LIMIT_ENV)
    assert load_dataset("cifar10", data_dir=tmp_path).num_classes == 10


def test_a_single_label_of_a_billion_is_refused_before_a_billion_way_classifier(tmp_path: Path) -> None:
    arrays = {**tiny_arrays((7,)), "y_train": np.array([0, 1] * 14 + [1, 10**9])}
    message = _one_line_error(write_npz(tmp_path / "labels.npz", arrays), "K = 1,000,000,001 classes, more than the limit")
    assert "numpy.unique(y, return_inverse=True)" in message
    ok = {**tiny_arrays((7,)), "y_train": np.arange(30) % 3, "y_test": np.arange(20) % 3}
    assert load_dataset(write_npz(tmp_path / "ok.npz", ok)).num_classes == 3


def test_200_pngs_of_13000_px_are_refused_from_their_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """13000×13000 is past Pillow's own bomb limit too: its warning becomes this one line, nothing is printed."""
    for cls in ("a", "b"):
        for i in range(100):
            png_header_only(tmp_path / "big" / cls / f"{i:03d}.png", 13000, 13000)
    monkeypatch.setattr(folders, "decode", lambda *a: pytest.fail("decoded a bomb"))
    _one_line_error(tmp_path / "big", r"image too large .*the limit is 16,777,216 pixels")


def test_one_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image_folder(tmp_path / "d", {"a": [np.zeros((4, 4), np.uint8)] * 12, "b": [np.zeros((4, 4), np.uint8)] * 12})
    png_header_only(tmp_path / "d" / "b" / "huge.png", 5000, 5000)  # 25 Mpx: under Pillow's limit, over ours
    monkeypatch.setattr(folders, "decode", lambda *a: pytest.fail("decoded a bomb"))
    message = _one_line_error(tmp_path / "d", r"image is 5000×5000 pixels, more than the limit of 16,777,216")
    assert "huge.png" in message


def test_many_images_under_the_pixel_limit_are_refused_by_their_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in ("a", "b"):
        for i in range(70):  # 140 × 4096² bytes = 2.2 GiB once decoded
            png_header_only(tmp_path / "many" / cls / f"{i:03d}.png", 4096, 4096)
    monkeypatch.setattr(folders, "decode", lambda *a: pytest.fail("decoded a bomb"))
    _one_line_error(tmp_path / "many", r"140 images of 1×4096×4096 would take 2.19 GiB, more than the 2 GiB limit")
