"""Inputs that used to end in "internal error" are one-line DataErrors, and the image-folder fixes hold.

Non-UTF-8 names, object-array class names, encrypted zip members, a data set that gained classes,
torch Datasets that yield dicts, float ``.npz`` files (no warning), 16-bit PNGs (scaled, not clipped)
and the decode cache (keyed on the folder's root and every image's bytes).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from _datafiles import patch_zip_member, tiny_arrays, write_idx, write_image_folder, write_npz, write_zip_npz
from robustopt.data import folders
from robustopt.data.datasets import load_dataset
from robustopt.data.formats import read_idx, read_npz
from robustopt.data.validation import check_class_count, example_pair
from robustopt.errors import DataError

BAD_NAME = os.fsdecode(b"caf\xe9")  # Latin-1 "café": not UTF-8, a surrogate escape in Python


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTOPT_DATA", raising=False)


def _error(path: str | Path, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(path)
    message = str(info.value)
    assert "\n" not in message
    message.encode("utf-8")  # printable: no lone surrogates
    return message


def _images(n: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- names that are not UTF-8


def test_image_file_names_that_are_not_utf8_load_and_errors_naming_them_print(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "d", {"a": _images(12, (4, 4), 0), "b": _images(12, (4, 4), 1)})
    shutil.copy(tmp_path / "d" / "a" / "000.png", tmp_path / "d" / "a" / f"{BAD_NAME}.png")
    ds = load_dataset(tmp_path / "d")
    assert len(ds.y_train) + len(ds.y_test) == 25
    (tmp_path / "d" / "b" / f"{BAD_NAME}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert "caf\\xe9.png" in _error(tmp_path / "d", "not a readable image")


def test_class_folder_and_data_paths_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "d", {"a": _images(12, (4, 4), 0), BAD_NAME: _images(12, (4, 4), 1)})
    assert "caf\\xe9" in _error(tmp_path / "d", "class folder's name is not valid UTF-8; rename it")
    path = write_npz(tmp_path / f"{BAD_NAME}.npz", tiny_arrays((7,)))
    _error(path, "path is not valid UTF-8")


# ---------------------------------------------------------------- npz members


def test_object_array_class_names_are_refused_without_unpickling(tmp_path: Path) -> None:
    names = np.array(["cat", "dog", {"evil": 1}], dtype=object)
    arrays = {**tiny_arrays((7,)), "y_train": np.arange(30) % 3, "y_test": np.arange(20) % 3, "class_names": names}
    message = _error(write_npz(tmp_path / "o.npz", arrays), "array class_names.npy holds Python objects.*never unpickles")
    assert "o.npz" in message


@pytest.mark.parametrize("names", [np.array([b"cat", b"dog", b"emu"]), np.array([[b"cat"], [b"dog"], [b"emu"]])])
def test_bytes_class_names_are_decoded_and_bad_shapes_refused(tmp_path: Path, names: np.ndarray) -> None:
    arrays = {**tiny_arrays((7,)), "y_train": np.arange(30) % 3, "y_test": np.arange(20) % 3, "class_names": names}
    path = write_npz(tmp_path / "n.npz", arrays)
    if names.ndim == 1:
        assert load_dataset(path).class_names == ("cat", "dog", "emu")
    else:
        _error(path, "class_names must be a 1-d array of strings")


def test_an_encrypted_zip_member_is_a_data_error(tmp_path: Path) -> None:
    path = patch_zip_member(write_zip_npz(tmp_path / "enc.npz", tiny_arrays((7,))), "y_test.npy", encrypted=True)
    _error(path, "member y_test.npy is encrypted; robustopt reads only plain .npz files")


@pytest.mark.parametrize("builtin", [False, True])
def test_float_npz_loads_without_any_warning(tmp_path: Path, builtin: bool) -> None:
    """Arrays read from a zip used to be read-only, and torch.from_numpy warned (a multi-line message)."""
    arrays = {k: (v.astype(np.float32) / 255 if k.startswith("x") else v) for k, v in tiny_arrays().items()}
    path = write_npz(tmp_path / ("fashion-mnist.npz" if builtin else "float.npz"), arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("fashion-mnist", data_dir=tmp_path) if builtin else load_dataset(path)
    assert ds.x_train.dtype == torch.float32
    ds.x_train.add_(0)  # writable memory
    # torch warns only once per process, so the warning check alone can miss it: the readers' arrays are writable.
    assert all(a.flags.writeable for a in read_npz(path).values())


def test_idx_arrays_are_writable(tmp_path: Path) -> None:
    paths = write_idx(tmp_path, tiny_arrays(), gz=True)
    assert read_idx(paths["x_train"]).flags.writeable


# ---------------------------------------------------------------- classes and torch Datasets


def test_check_class_count_refuses_a_data_set_that_gained_classes() -> None:
    check_class_count(10, 10)
    check_class_count(3, 10, "evaluate")  # fewer classes: fine
    with pytest.raises(DataError, match="run: the data has 12 classes but the run was built for 10; .*start a new run"):
        check_class_count(12, 10, "run")


class _DictItems(TorchDataset):
    def __init__(self, keys: tuple[str, str]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, object]:
        return {self.keys[0]: torch.full((1, 4, 4), i / 8), self.keys[1]: i % 2, "id": f"item{i}"}


def test_dict_items_with_one_input_and_one_label_key_become_pairs() -> None:
    x, y = example_pair(_DictItems(("image", "label"))[3], "train_data")
    assert x.shape == (1, 4, 4) and int(y) == 1
    batch = next(iter(DataLoader(_DictItems(("pixel_values", "labels")), batch_size=4)))  # default_collate: a dict
    xb, yb = example_pair(batch, "train_data")
    assert xb.shape == (4, 1, 4, 4) and yb.tolist() == [0, 1, 0, 1]
    xb, yb = example_pair((torch.zeros(2, 3), torch.tensor([0, 1]), "extra"), "train_data")
    assert yb.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"pixels": torch.zeros(3), "class": 1}, r"yields dicts with keys \[class, pixels\]; return \(input, label\) pairs"),
        ({"image": torch.zeros(3), "x": torch.zeros(3), "label": 1}, r"keys \[image, label, x\]"),
        ("a string", "yields str items; each item must be an .input, label. pair"),
        ((torch.zeros(3),), "yields tuple items"),
        (({"nested": 1}, 0), "an item is not made of tensors or arrays"),
    ],
)
def test_items_that_are_not_pairs_are_one_line_data_errors(item: object, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        example_pair(item, "train_data")
    assert "\n" not in str(info.value) and str(info.value).startswith("train_data")


# ---------------------------------------------------------------- 16-bit images


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    values = np.array([[0, 257, 32767, 32896], [65535, 65280, 128, 129]], np.uint16)  # (2, 4)
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls).mkdir(parents=True)
        Image.fromarray(values).save(tmp_path / "train" / cls / "img.png")
        Image.fromarray(values).save(tmp_path / "test" / cls / "img.png")
    assert Image.open(tmp_path / "train" / "a" / "img.png").mode == "I;16"
    ds = load_dataset(tmp_path)
    want = np.rint(values / 65535 * 255).astype(np.uint8)
    assert ds.input_shape == (1, 2, 4) and np.array_equal(ds.x_train[0, 0].numpy(), want)
    assert want.max() == 255 and len(np.unique(want)) > 3  # the old clip made everything above 255 white
    # With one colour image in the folder, the 16-bit image is replicated over three channels, still scaled.
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "train" / "b" / "rgb.png")
    ds = load_dataset(tmp_path)
    assert ds.input_shape == (3, 2, 4) and all(np.array_equal(ds.x_test[0, c].numpy(), want) for c in range(3))


# ---------------------------------------------------------------- the decode cache


def _same_size_folder(root: Path, seed: int) -> None:
    """BMP images: the file size depends only on the image size, so two folders can match in names and sizes."""
    write_image_folder(root, {"a": _images(12, (4, 4), seed), "b": _images(12, (4, 4), seed + 1)}, ext=".bmp")
    for f in root.rglob("*.bmp"):
        os.utime(f, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


def test_a_second_folder_with_the_same_names_sizes_and_mtimes_gets_its_own_pixels(tmp_path: Path) -> None:
    _same_size_folder(tmp_path / "one", seed=0)
    _same_size_folder(tmp_path / "two", seed=10)
    first, second = load_dataset(tmp_path / "one"), load_dataset(tmp_path / "two")
    assert not torch.equal(first.x_train, second.x_train)
    assert np.array_equal(second.x_train[0, 0].numpy(), _images(12, (4, 4), 10)[_first_train_index("a")])
    assert len(list((tmp_path / "cache" / "robustopt" / "folders").glob("*.npz"))) == 2  # the documented location


def _first_train_index(cls: str) -> int:
    return next(i for i in range(12) if not folders._is_test(cls, f"{i:03d}.bmp"))


def test_content_edited_in_place_with_the_same_size_and_mtime_is_decoded_again(tmp_path: Path) -> None:
    _same_size_folder(tmp_path / "d", seed=0)
    before = load_dataset(tmp_path / "d")
    _same_size_folder(tmp_path / "d", seed=20)  # rewritten: same names, sizes and mtimes, other pixels
    after = load_dataset(tmp_path / "d")
    assert not torch.equal(before.x_train, after.x_train)
    assert np.array_equal(after.x_train[0, 0].numpy(), _images(12, (4, 4), 20)[_first_train_index("a")])


def test_an_edited_cache_file_is_not_trusted(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "d", {"a": _images(12, (4, 4), 0), "b": _images(12, (4, 4), 1)})
    first = load_dataset(tmp_path / "d")
    (cached,) = (tmp_path / "cache" / "robustopt" / "folders").glob("*.npz")
    with np.load(cached) as z:
        arrays = {k: z[k] for k in z.files}
    write_npz(cached, {**arrays, "y_train": np.full_like(arrays["y_train"], 7)})  # labels edited: 7 of 2 classes
    again = load_dataset(tmp_path / "d")
    assert torch.equal(again.y_train, first.y_train) and torch.equal(again.x_train, first.x_train)
