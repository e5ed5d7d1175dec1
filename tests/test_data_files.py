"""Dataset files and downloads: every format round-trips exactly, nothing is unpickled, checksums gate downloads.

Tiny synthetic datasets are written in each supported format (npz, IDX raw and gzip, CIFAR-10
binary) and read back through :func:`robustopt.data.datasets.load_dataset` with ``data_dir``; downloads use
``file://`` URLs to local files, so the checksum logic runs for real without a network.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _datafiles import (
    cifar100_records,
    cifar_records,
    idx_bytes,
    tiny_arrays,
    write_cifar100_bin,
    write_cifar_bin,
    write_idx,
    write_npz,
)
from robustopt.data.datasets import load_dataset
from robustopt.data.download import Remote, download
from robustopt.data.formats import read_idx
from robustopt.errors import CheckpointError, DataError
from robustopt.tensors import load_tensors, save_tensors


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTOPT_DATA", raising=False)


def assert_matches(ds, arrays: dict[str, np.ndarray], nhwc: bool = False) -> None:
    """The loaded dataset holds exactly ``arrays``: uint8 (N, C, H, W) images, int64 labels."""
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        want = x.transpose(0, 3, 1, 2) if nhwc else x[:, None]
        got = getattr(ds, f"x_{split}")
        assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape
        assert np.array_equal(got.numpy(), want)
        labels = getattr(ds, f"y_{split}")
        assert labels.dtype == torch.int64 and np.array_equal(labels.numpy(), arrays[f"y_{split}"])


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("filename", ["fashion-mnist.npz", "fashion_mnist.npz"])
def test_npz_round_trip(filename: str, tmp_path: Path) -> None:
    arrays = tiny_arrays()
    write_npz(tmp_path / filename, arrays)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_matches(ds, arrays)
    assert ds.mean == (0.2860,) and ds.input_shape == (1, 28, 28)


def test_npz_nhwc_cifar_round_trip(tmp_path: Path) -> None:
    arrays = tiny_arrays((32, 32, 3))
    write_npz(tmp_path / "cifar10.npz", arrays)
    assert_matches(load_dataset("cifar10", data_dir=tmp_path), arrays, nhwc=True)


def test_npz_float_images_in_unit_interval_are_kept(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    write_npz(tmp_path / "fashion-mnist.npz", arrays)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.x_train.dtype == torch.float32
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["x_train"]))


class _TouchOnUnpickle:
    """Unpickling this creates the file ``path``: a harmless stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_npz_never_unpickles(tmp_path: Path) -> None:
    """An object array whose unpickling would create a file: loading must refuse, and the file must not appear."""
    marker = tmp_path / "pwned"
    y = np.empty(30, dtype=object)
    y[:] = [_TouchOnUnpickle(marker)] * 30
    write_npz(tmp_path / "fashion-mnist.npz", {**tiny_arrays(), "y_train": y})  # numpy pickles object arrays
    with pytest.raises(DataError, match="fashion-mnist.npz"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert not marker.exists()
    with np.load(tmp_path / "fashion-mnist.npz", allow_pickle=True) as z:  # the control: the payload is live
        z["y_train"]
    assert marker.exists()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", ["subdir", "flat"])
def test_idx_round_trip(gz: bool, layout: str, tmp_path: Path) -> None:
    arrays = tiny_arrays()
    write_idx(tmp_path / "fashion-mnist" if layout == "subdir" else tmp_path, arrays, gz=gz)
    assert_matches(load_dataset("fashion-mnist", data_dir=tmp_path), arrays)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6)))
def test_read_idx_inverts_the_idx_encoding(arr: np.ndarray) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a-idx"
        p.write_bytes(idx_bytes(arr))
        got = read_idx(p)
    assert got.shape == arr.shape and np.array_equal(got, arr)


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=64))
def test_read_idx_rejects_any_short_or_garbled_file_with_data_error(raw: bytes) -> None:
    """Arbitrary bytes are either a valid IDX file or a DataError; never another exception."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x-idx"
        p.write_bytes(raw)
        try:
            arr = read_idx(p)
        except DataError:
            return
    assert idx_bytes(arr) == raw  # accepted only if it re-encodes to exactly the same bytes


@pytest.mark.parametrize("folder", ["cifar-10-batches-bin", "cifar10"])
def test_cifar_binary_round_trip(folder: str, tmp_path: Path) -> None:
    arrays = tiny_arrays((32, 32, 3), n_train=23)  # uneven split over the five batch files
    write_cifar_bin(tmp_path / folder, arrays)
    assert_matches(load_dataset("cifar10", data_dir=tmp_path), arrays, nhwc=True)


def test_cifar_record_layout(tmp_path: Path) -> None:
    """One record: the label byte, then the R, G and B planes, each 32×32 row-major."""
    x = np.zeros((1, 32, 32, 3), np.uint8)
    x[0, 1, 2] = (10, 20, 30)  # pixel at row 1, column 2
    raw = cifar_records(x, np.array([7]))
    assert len(raw) == 3073 and raw[0] == 7
    assert (raw[1 + 0 * 1024 + 34], raw[1 + 1 * 1024 + 34], raw[1 + 2 * 1024 + 34]) == (10, 20, 30)


def test_data_dir_is_searched_before_the_environment_and_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, env, cache = tiny_arrays(seed=1), tiny_arrays(seed=2), tiny_arrays(seed=3)
    write_npz(tmp_path / "mine" / "fashion-mnist.npz", first)
    write_npz(tmp_path / "env" / "fashion-mnist.npz", env)
    write_npz(tmp_path / "cache" / "robustopt" / "fashion-mnist.npz", cache)
    monkeypatch.setenv("ROBUSTOPT_DATA", str(tmp_path / "env"))
    assert_matches(load_dataset("fashion-mnist", data_dir=tmp_path / "mine"), first)
    assert_matches(load_dataset("fashion-mnist"), env)
    monkeypatch.delenv("ROBUSTOPT_DATA")
    assert_matches(load_dataset("fashion-mnist"), cache)


# ---------------------------------------------------------------- safetensors content hash


def test_save_load_tensors_round_trip_with_scalar_bf16_and_empty_tensors(tmp_path: Path) -> None:
    """0-dim tensors (BatchNorm's num_batches_tracked), bf16 and empty tensors all hash and round-trip."""
    tensors = {
        "steps": torch.tensor(7, dtype=torch.int64),
        "scale": torch.tensor(0.5),
        "w": torch.randn(3, 4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 5),
    }
    save_tensors(tmp_path / "t.safetensors", tensors, {"epoch": 3})
    got, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta == {"epoch": 3} and got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    raw = bytearray((tmp_path / "t.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "t.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="content-hash"):
        load_tensors(tmp_path / "t.safetensors")


# ---------------------------------------------------------------- downloads


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _remote(path: Path, md5: str | None = None, name: str | None = None) -> Remote:
    return Remote(path.as_uri(), md5 or _md5(path.read_bytes()), name or path.name)


def test_download_verified_file_is_saved_and_loads(tmp_path: Path) -> None:
    """IDX .gz files served from file:// URLs with correct MD5s land in dest/NAME and load back exactly."""
    arrays = tiny_arrays()
    served = write_idx(tmp_path / "server", arrays, gz=True)
    sources = {"fashion-mnist": [_remote(p) for p in served.values()]}
    target = download("fashion-mnist", tmp_path / "dest", sources=sources)
    assert target == tmp_path / "dest" / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in served.values())  # no temp files left
    assert all((target / p.name).read_bytes() == p.read_bytes() for p in served.values())
    assert_matches(load_dataset("fashion-mnist", data_dir=tmp_path / "dest"), arrays)


def test_download_wrong_checksum_saves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "server" / "train-images-idx3-ubyte.gz"
    src.parent.mkdir()
    src.write_bytes(b"tampered content")
    sources = {"fashion-mnist": [_remote(src, md5="0" * 32)]}
    with pytest.raises(DataError, match="checksum mismatch") as info:
        download("fashion-mnist", tmp_path / "dest", sources=sources)
    assert _md5(b"tampered content") in str(info.value)
    target = tmp_path / "dest" / "fashion-mnist"
    assert not target.exists() or list(target.iterdir()) == []  # neither the file nor a temp file


def test_download_replaces_a_corrupt_existing_file_only_after_verification(tmp_path: Path) -> None:
    good = tmp_path / "server" / "f.gz"
    good.parent.mkdir()
    good.write_bytes(b"the real bytes")
    target = tmp_path / "dest" / "x"
    target.mkdir(parents=True)
    (target / "f.gz").write_bytes(b"half a fi")
    download("x", tmp_path / "dest", sources={"x": [_remote(good)]})
    assert (target / "f.gz").read_bytes() == b"the real bytes"
    # A wrong checksum on a later attempt leaves the verified file in place.
    with pytest.raises(DataError):
        download("x", tmp_path / "dest", sources={"x": [_remote(good, md5="1" * 32)]})
    assert (target / "f.gz").read_bytes() == b"the real bytes"


def test_download_missing_source_and_unknown_name(tmp_path: Path) -> None:
    gone = Remote((tmp_path / "nothing.gz").as_uri(), "0" * 32, "nothing.gz")
    with pytest.raises(DataError, match="could not download"):
        download("x", tmp_path / "dest", sources={"x": [gone]})
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        download("imagenet", tmp_path / "dest")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_download_cifar_archive_unpacks_and_loads(tmp_path: Path) -> None:
    arrays = tiny_arrays((32, 32, 3))
    batches = write_cifar_bin(tmp_path / "build" / "cifar-10-batches-bin", arrays)
    members = {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in sorted(batches.iterdir())}
    archive = _tar(tmp_path / "server" / "cifar-10-binary.tar.gz", members)
    download("cifar10", tmp_path / "dest", sources={"cifar10": [_remote(archive)]})
    assert_matches(load_dataset("cifar10", data_dir=tmp_path / "dest"), arrays, nhwc=True)


def test_download_refuses_an_archive_that_escapes_its_directory(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "server" / "evil.tar.gz", {"../../escaped.bin": b"x", "ok.bin": b"y"})
    with pytest.raises(DataError, match="could not unpack"):
        download("evil", tmp_path / "a" / "b", sources={"evil": [_remote(archive)]})
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "a" / "escaped.bin").exists()


# ---------------------------------------------------------------- CIFAR-100


def _cifar100_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    arrays = tiny_arrays((32, 32, 3), n_train=25, n_test=15, seed=seed)
    rng = np.random.default_rng(seed)
    arrays["y_train"] = rng.permutation(np.arange(25) * 4)  # fine labels up to 96, coarse (fine // 5) differ
    arrays["y_test"] = rng.integers(0, 100, 15)
    return arrays


@pytest.mark.parametrize("folder", ["cifar-100-binary", "cifar100"])
def test_cifar100_binary_round_trip_uses_fine_labels(folder: str, tmp_path: Path) -> None:
    arrays = _cifar100_arrays()
    names = [f"class{i:02d}" for i in range(100)]
    write_cifar100_bin(tmp_path / folder, arrays, names)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert_matches(ds, arrays, nhwc=True)
    assert ds.num_classes == 100 and ds.class_names == tuple(names) and ds.kind == "cifar100"
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.input_shape == (3, 32, 32)


def test_cifar100_record_layout() -> None:
    """One record: coarse label byte, fine label byte, then the R, G and B planes."""
    x = np.zeros((1, 32, 32, 3), np.uint8)
    x[0, 0, 1] = (5, 6, 7)
    raw = cifar100_records(x, np.array([42]), np.array([8]))
    assert len(raw) == 3074 and raw[0] == 8 and raw[1] == 42
    assert (raw[2 + 1], raw[2 + 1024 + 1], raw[2 + 2048 + 1]) == (5, 6, 7)


def test_cifar100_truncated_file_is_a_data_error(tmp_path: Path) -> None:
    d = write_cifar100_bin(tmp_path / "cifar-100-binary", _cifar100_arrays())
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match="train.bin: size .* is not a multiple of 3074"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_cifar100_missing_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="robustopt download cifar100"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_download_cifar100_archive_unpacks_and_loads(tmp_path: Path) -> None:
    arrays = _cifar100_arrays(seed=1)
    built = write_cifar100_bin(tmp_path / "build" / "cifar-100-binary", arrays, [f"c{i}" for i in range(100)])
    members = {f"cifar-100-binary/{p.name}": p.read_bytes() for p in sorted(built.iterdir())}
    archive = _tar(tmp_path / "server" / "cifar-100-binary.tar.gz", members)
    download("cifar100", tmp_path / "dest", sources={"cifar100": [_remote(archive)]})
    ds = load_dataset("cifar100", data_dir=tmp_path / "dest")
    assert_matches(ds, arrays, nhwc=True)
    assert ds.class_names is not None and ds.class_names[99] == "c99"


def test_cifar100_is_registered_for_download_with_its_published_md5() -> None:
    from robustopt.data.download import SOURCES

    (remote,) = SOURCES["cifar100"]
    assert remote.url.endswith("/cifar-100-binary.tar.gz") and remote.md5 == "03b5dce01913d631647c71ecec9e9cb8"


# ---------------------------------------------------------------- the user's own .npz


def _user_arrays(x_shape: tuple[int, ...], k: int = 5, dtype: type = np.uint8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    make = (
        (lambda n: rng.integers(0, 256, (n, *x_shape), dtype=np.uint8))
        if dtype == np.uint8
        else (lambda n: rng.random((n, *x_shape)).astype(dtype))
    )
    return {
        "x_train": make(40),
        "y_train": np.arange(40) % k,
        "x_test": make(10),
        "y_test": rng.integers(0, k, 10),
    }


@pytest.mark.parametrize(
    ("x_shape", "dtype", "want"),
    [
        ((7,), np.float32, (7,)),  # feature vectors
        ((6, 5), np.uint8, (1, 6, 5)),  # grayscale
        ((6, 5, 3), np.uint8, (3, 6, 5)),  # channels-last
        ((2, 6, 5), np.float64, (2, 6, 5)),  # channels-first, 2 channels
    ],
)
def test_user_npz_any_shape_and_classes(tmp_path: Path, x_shape: tuple[int, ...], dtype: type, want: tuple[int, ...]) -> None:
    arrays = _user_arrays(x_shape, dtype=dtype)
    path = write_npz(tmp_path / "mine.npz", arrays)
    ds = load_dataset(str(path))
    assert ds.input_shape == want and ds.num_classes == 5 and ds.kind == "npz" and ds.name == str(path.resolve())
    assert ds.class_names is None
    x = arrays["x_train"]
    nchw = x.transpose(0, 3, 1, 2) if len(x_shape) == 3 and x_shape[-1] == 3 else x.reshape(len(x), *want)
    assert np.array_equal(ds.x_train.numpy(), nchw.astype(ds.x_train.numpy().dtype))
    assert ds.y_test.dtype == torch.int64 and np.array_equal(ds.y_test.numpy(), arrays["y_test"])
    # Statistics of the training inputs on the [0, 1] scale: per channel (images) or per feature (vectors).
    unit = nchw / 255.0 if dtype == np.uint8 else nchw.astype(np.float64)
    axes = (0,) if len(want) == 1 else (0, 2, 3)
    np.testing.assert_allclose(ds.mean, unit.mean(axes), atol=2e-6)
    np.testing.assert_allclose(ds.std, unit.std(axes), atol=2e-6)
    assert load_dataset(ds.name).input_shape == want  # the recorded name reloads it


def test_user_npz_class_names_and_constant_channel(tmp_path: Path) -> None:
    arrays = _user_arrays((3, 4, 4), k=3)
    arrays["x_train"][:, 1] = 7  # a constant channel: centred only (std 1), never divided by zero
    path = write_npz(tmp_path / "named.npz", {**arrays, "class_names": np.array(["cat", "dog", "emu"])})
    ds = load_dataset(path)
    assert ds.class_names == ("cat", "dog", "emu") and ds.num_classes == 3
    assert ds.std[1] == 1.0 and abs(ds.mean[1] - 7 / 255) < 1e-6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_train": -(np.arange(40) % 5)}, "labels must be >= 0, found -4"),
        ({"y_test": np.full(10, 5)}, r"labels must lie in 0..4 \(the classes\), found 5"),
        ({"y_train": np.zeros(40, np.int64)}, "only one class"),
        ({"y_train": np.arange(40) % 5 + 0.0}, "labels must be integers"),
        ({"y_test": np.zeros(9, np.int64)}, r"labels have shape \(9,\), expected \(10,\)"),
        ({"x_train": np.full((40, 7), np.nan, np.float32)}, "NaN or infinite"),
        ({"x_train": np.full((40, 7), 2.0, np.float32)}, r"float inputs must lie in \[0, 1\], got range \[2, 2\]"),
        ({"x_train": np.zeros((40, 7), np.int64)}, "must be uint8 .* or float in \\[0, 1\\], got dtype int64"),
        ({"x_test": np.zeros((10, 8), np.float32)}, "examples have different shapes"),
        ({"x_test": np.zeros((0, 7), np.float32), "y_test": np.zeros(0, np.int64)}, "x_test: no examples"),
        ({"x_train": np.zeros((0, 7), np.float32), "y_train": np.zeros(0, np.int64)}, "x_train: no examples"),
        ({"y_train": np.arange(40) % 5 + 10**9}, "K = 1,000,000,005 classes, more than the limit of 100,000"),
        ({"x_train": np.zeros((40, 1, 2, 3, 4), np.uint8)}, r"inputs have shape \(40, 1, 2, 3, 4\)"),
    ],
)
def test_bad_user_npz_is_a_one_line_data_error(tmp_path: Path, change: dict, message: str) -> None:
    path = write_npz(tmp_path / "bad.npz", {**_user_arrays((7,), dtype=np.float32), **change})
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_user_npz_missing_arrays_and_unknown_names(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "half.npz", {"x_train": np.zeros((3, 2), np.float32)})
    with pytest.raises(DataError, match="missing arrays y_train, x_test, y_test"):
        load_dataset(path)
    with pytest.raises(DataError, match="unknown dataset 'cifar1000'.*or a path to an .npz or image folder"):
        load_dataset("cifar1000")
