"""fingerprint: a content hash of the training data that changes with any example or label, and check_same_data
refuses a resume on changed data in one line (the issue's case: a replaced .npz, 600 -> 900 examples, new labels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from _datafiles import write_image_folder, write_npz
from robustopt.data.datasets import load_dataset
from robustopt.data.fingerprint import check_same_data, data_fingerprint
from robustopt.errors import DataError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _arrays(n: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.random((n, 5)).astype(np.float32),
        "y_train": np.arange(n) % k,
        "x_test": rng.random((20, 5)).astype(np.float32),
        "y_test": np.arange(20) % k,
    }


def test_a_replaced_npz_is_refused_on_resume(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz", _arrays(600, 10))
    recorded = json.loads(json.dumps(data_fingerprint(load_dataset(path))))  # what config.json holds
    assert recorded["source"] == str(path.resolve()) and recorded["n_train"] == 600 and recorded["num_classes"] == 10
    check_same_data(recorded, data_fingerprint(load_dataset(path)))  # unchanged: passes
    write_npz(path, _arrays(900, 12))
    with pytest.raises(DataError, match=r"--resume: the data changed since the run started \(n_train 600 -> 900; ") as info:
        check_same_data(recorded, data_fingerprint(load_dataset(path)))
    message = str(info.value)
    assert "num_classes 10 -> 12" in message and "sha256 " in message and "\n" not in message


def test_one_changed_label_or_pixel_changes_the_hash() -> None:
    x, y = torch.rand(50, 3, 4, 4), torch.arange(50) % 3
    base = data_fingerprint((x, y))["sha256"]
    y2 = y.clone()
    y2[17] = (y2[17] + 1) % 3
    x2 = x.clone()
    x2[3, 1, 2, 2] += 1e-6
    assert len({base, data_fingerprint((x, y2))["sha256"], data_fingerprint((x2, y))["sha256"]}) == 3
    assert data_fingerprint((x.double(), y))["sha256"] != base  # the dtype is part of the content
    assert data_fingerprint((x.reshape(50, 48), y))["sha256"] != base  # and so is the shape


def test_the_same_data_in_any_wrapper_has_the_same_fingerprint() -> None:
    x, y = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8), torch.arange(30) % 2
    want = data_fingerprint((x, y))
    assert data_fingerprint(TensorDataset(x, y)) == want == data_fingerprint(DataLoader(TensorDataset(x, y), batch_size=7))
    assert want["n_train"] == 30 and want["input_shape"] == [1, 4, 4] and want["num_classes"] == 2
    assert data_fingerprint((x.to(torch.bfloat16), y))["sha256"] != want["sha256"]  # any dtype hashes


def test_same_content_elsewhere_passes_and_an_image_folder_is_hashed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_image_folder(tmp_path / "a", {c: [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(12)] for c in ("a", "b")})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fa, fb = data_fingerprint(load_dataset(tmp_path / "a")), data_fingerprint(load_dataset(tmp_path / "b"))
    assert fa["source"] != fb["source"] and fa["sha256"] == fb["sha256"]
    check_same_data(fa, fb)  # moved, not changed
    assert data_fingerprint(load_dataset(tmp_path / "a"), path=tmp_path / "b")["source"] == str((tmp_path / "b").resolve())


class _Items(TorchDataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3), i % 2


def test_other_torch_datasets_are_described_not_read_and_compared_by_source_and_size() -> None:
    got = data_fingerprint(_Items())
    assert got["sha256"] is None and got["n_train"] == 5 and got["source"].endswith("_Items")
    check_same_data(got, data_fingerprint(_Items()))
    with pytest.raises(DataError, match="n_train 5 -> 6"):
        check_same_data(got, {**got, "n_train": 6})


def test_check_same_data_accepts_old_runs_and_refuses_edited_records() -> None:
    current = data_fingerprint((torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])))
    check_same_data(None, current)  # a run from before fingerprints
    check_same_data({"sha256": current["sha256"]}, current)  # fields missing on one side are not compared
    with pytest.raises(DataError, match="not an object"):
        check_same_data(["sha256"], current)  # type: ignore[arg-type]
