"""Image folders: pixel-exact round trip, the documented hash split, the cache, and one-line errors naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _datafiles import write_image_folder
from robustopt.data import folders
from robustopt.data.datasets import load_dataset
from robustopt.errors import DataError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _images(n: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _expect(root: Path, classes: dict[str, list[np.ndarray]], split: str) -> tuple[np.ndarray, np.ndarray]:
    """The documented hash split, computed independently: NCHW images and labels of ``split`` in class/file order."""
    xs, ys = [], []
    for label, cls in enumerate(sorted(classes)):
        for i, img in enumerate(classes[cls]):
            if (folders._is_test(cls, f"{i:03d}.png")) == (split == "test"):
                xs.append(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
                ys.append(label)
    return np.stack(xs), np.array(ys)


def test_rgb_folder_round_trips_exactly_with_the_hash_split_and_stats(tmp_path: Path) -> None:
    classes = {"zebra": _images(25, (6, 5, 3), 0), "ant": _images(25, (6, 5, 3), 1), "cow": _images(20, (6, 5, 3), 2)}
    write_image_folder(tmp_path / "data", classes)
    ds = load_dataset(str(tmp_path / "data"))
    assert ds.kind == "folder" and ds.class_names == ("ant", "cow", "zebra") and ds.num_classes == 3
    assert ds.name == str((tmp_path / "data").resolve()) and ds.input_shape == (3, 6, 5)
    for split in ("train", "test"):
        x, y = _expect(tmp_path / "data", classes, split)
        assert getattr(ds, f"x_{split}").dtype == torch.uint8
        assert np.array_equal(getattr(ds, f"x_{split}").numpy(), x) and np.array_equal(getattr(ds, f"y_{split}").numpy(), y)
    assert 0 < len(ds.y_test) < 0.25 * 70  # about one in ten
    flat = ds.x_train.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    np.testing.assert_allclose(ds.mean, flat.mean(1), atol=1e-6)
    np.testing.assert_allclose(ds.std, flat.std(1), atol=1e-6)


def test_train_test_layout_grayscale_and_mixed_modes(tmp_path: Path) -> None:
    gray = {"a": _images(3, (4, 4), 0), "b": _images(3, (4, 4), 1)}
    write_image_folder(tmp_path / "g" / "train", gray)
    write_image_folder(tmp_path / "g" / "val", {"b": _images(2, (4, 4), 2)})
    ds = load_dataset(tmp_path / "g")
    assert ds.input_shape == (1, 4, 4) and len(ds.y_train) == 6 and ds.y_test.tolist() == [1, 1]
    assert np.array_equal(ds.x_test[0, 0].numpy(), _images(2, (4, 4), 2)[0])
    # One colour image makes the whole folder RGB; grayscale images are replicated over the channels.
    write_image_folder(tmp_path / "m" / "train", {**gray, "c": _images(3, (4, 4, 3), 3)})
    write_image_folder(tmp_path / "m" / "test", {"a": _images(1, (4, 4), 4)})
    ds = load_dataset(tmp_path / "m")
    assert ds.input_shape == (3, 4, 4) and ds.num_classes == 3
    assert all(np.array_equal(ds.x_test[0, c].numpy(), _images(1, (4, 4), 4)[0]) for c in range(3))


def test_cache_is_reused_and_invalidated_by_a_touched_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_image_folder(tmp_path / "d", {"a": _images(12, (4, 4), 0), "b": _images(12, (4, 4), 1)})
    first = load_dataset(tmp_path / "d")
    assert len(list((tmp_path / "cache" / "robustopt" / "folders").glob("*.npz"))) == 1
    calls = []
    real_decode = folders.decode
    monkeypatch.setattr(folders, "decode", lambda *a: calls.append(1) or real_decode(*a))
    again = load_dataset(tmp_path / "d")
    assert calls == [] and torch.equal(first.x_train, again.x_train) and again.class_names == ("a", "b")
    st = paths["a"][0].stat()
    os.utime(paths["a"][0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset(tmp_path / "d")
    assert calls == [1, 1]  # decoded again (train and test)


def test_a_damaged_cache_file_is_rebuilt(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "d", {"a": _images(12, (4, 4), 0), "b": _images(12, (4, 4), 1)})
    first = load_dataset(tmp_path / "d")
    (cached,) = (tmp_path / "cache" / "robustopt" / "folders").glob("*.npz")
    cached.write_bytes(b"not a zip")
    assert torch.equal(load_dataset(tmp_path / "d").x_train, first.x_train)


def _corrupt(tmp_path: Path, case: str) -> tuple[Path, str]:
    root = tmp_path / case
    good = {"a": _images(12, (4, 4), 0), "b": _images(12, (4, 4), 1)}
    if case == "empty":
        root.mkdir()
        return root, "no class subfolders"
    if case == "one-class":
        write_image_folder(root, {"a": good["a"]})
        return root, "only one class folder \\(a\\)"
    paths = write_image_folder(root, good)
    if case == "no-images":
        (root / "c").mkdir()
        (root / "c" / "notes.txt").write_text("x")
        return root, f"{root / 'c'}: class folder has no images"
    if case == "mixed-sizes":
        write_image_folder(tmp_path / "scratch", {"b": _images(1, (5, 4), 2)})
        (tmp_path / "scratch" / "b" / "000.png").replace(root / "b" / "zzz.png")
        return root, f"{root / 'b' / 'zzz.png'}: image is 4×5, the first image is 4×4"
    if case == "unreadable":
        paths["b"][3].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return root, f"{paths['b'][3]}: not a readable image"
    write_image_folder(root / "train", good)
    write_image_folder(root / "test", {"dog": _images(1, (4, 4), 3)})
    return root, "test class 'dog' is not a training class"


@pytest.mark.parametrize("case", ["empty", "one-class", "no-images", "mixed-sizes", "unreadable", "unknown-test-class"])
def test_bad_folders_are_one_line_data_errors_naming_the_problem(tmp_path: Path, case: str) -> None:
    root, message = _corrupt(tmp_path, case)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(root)
    assert "\n" not in str(info.value)


def test_missing_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset("mine.npz")
