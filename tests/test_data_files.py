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

from _datafiles import cifar_records, idx_bytes, tiny_arrays, write_cifar_bin, write_idx, write_npz
from robustopt.data.datasets import load_dataset, read_idx
from robustopt.data.download import Remote, download
from robustopt.errors import CheckpointError, DataError
from robustopt.runs import load_tensors, save_tensors


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
