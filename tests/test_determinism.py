"""Determinism and the run-directory rules: the seed fixes everything; finished runs are never overwritten by accident.

On CPU, two runs with the same ``--seed`` give bit-identical weights (initialisation, data order,
random starts); another seed gives other weights. ``--resume`` refuses a run directory that
holds a different configuration, and a finished run directory refuses to be trained into
without ``--overwrite``; both leave its files byte-identical.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from _datafiles import write_npz
from robustopt.data.datasets import Dataset
from robustopt.errors import ConfigError, RunDirError
from robustopt.tensors import load_tensors
from robustopt.training import distributed as dist
from robustopt.training.batches import Source, batches
from robustopt.training.config import TrainConfig
from robustopt.training.named import train

# paper-mnist with PGD from random starts: initialisation, data order and the attack generator all matter.
BASE = {"model": "paper-mnist", "method": "pgd", "steps": 2, "eps": 0.1, "epochs": 1, "batch_size": 50}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory: pytest.TempPathFactory, mnist: Dataset) -> Path:
    """A data dir whose mnist.npz holds real MNIST cut to 300 training and 200 test images (fast evaluation)."""
    d = tmp_path_factory.mktemp("small-mnist")
    arrays = {"x_train": mnist.x_train[:300], "y_train": mnist.y_train[:300], "x_test": mnist.x_test[:200]}
    write_npz(d / "mnist.npz", {**{k: v.numpy() for k, v in arrays.items()}, "y_test": mnist.y_test[:200].numpy()})
    return d


def _run(out: Path, data: Path, resume: bool = False, overwrite: bool = False, **changes: object) -> Path:
    cfg = TrainConfig(**{**BASE, **changes})
    train(cfg, out, data_dir=data, resume=resume, overwrite=overwrite, progress=False, log=lambda s: None)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "model.safetensors")[0]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, small_mnist: Path) -> dict[str, Path]:
    """Seed 0 twice and seed 1 once, each a real 1-epoch run on 300 MNIST images."""
    tmp = tmp_path_factory.mktemp("determinism")
    return {name: _run(tmp / name, small_mnist, seed=seed) for name, seed in (("a", 0), ("b", 0), ("other", 1))}


def test_same_seed_gives_identical_weights(runs: dict[str, Path]) -> None:
    wa, wb = _weights(runs["a"]), _weights(runs["b"])
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa) == 0.0


def test_other_seed_gives_other_weights(runs: dict[str, Path]) -> None:
    wa, wo = _weights(runs["a"]), _weights(runs["other"])
    learned = [k for k in wa if not k.startswith("normalize.")]  # the normalisation constants are data statistics
    assert len(learned) == 8 and all(not torch.equal(wa[k], wo[k]) for k in learned)


def test_data_order_is_a_pure_function_of_seed_and_epoch() -> None:
    x, y = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100)
    info, cpu = dist.DistInfo(), torch.device("cpu")

    def order(seed: int, epoch: int, start: int = 0) -> list[int]:
        return torch.cat(
            [b for _, b in batches(Source(x, y), 10, seed=seed, epoch=epoch, info=info, device=cpu, start=start)]
        ).tolist()

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(100))  # a permutation: every example once per epoch
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert order(0, 3, start=4) == order(0, 3)[40:]  # skipping consumed batches restores the position


def test_resume_refuses_a_different_configuration(runs: dict[str, Path], small_mnist: Path, tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    shutil.copytree(runs["a"], run)
    (run / "summary.json").unlink()
    before = _files(run)
    for change in ({"lr": 0.5}, {"seed": 1}, {"eps": 0.2}, {"method": "robust"}, {"subset": 200}):
        with pytest.raises(RunDirError, match="different configuration") as info:
            _run(run, small_mnist, resume=True, **change)
        assert next(iter(change)) in str(info.value)  # the message names the key that differs
        assert _files(run) == before


def test_finished_run_is_not_overwritten_without_overwrite(small_mnist: Path, tmp_path: Path) -> None:
    small = {**BASE, "model": "mlp", "subset": 100}
    run = _run(tmp_path / "finished", small_mnist, **small)
    first, before = _weights(run), _files(run)
    for resume in (False, True):
        with pytest.raises(RunDirError, match="--overwrite"):
            _run(run, small_mnist, **{**small, "lr": 0.02}, resume=resume)
        assert _files(run) == before
    _run(run, small_mnist, **small, overwrite=True)  # replaced; the same seed reproduces the same weights
    assert all(torch.equal(v, first[k]) for k, v in _weights(run).items())


def test_deterministic_flag_sets_pytorch_deterministic_algorithms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--deterministic`` turns on torch.use_deterministic_algorithms (what makes CUDA kernels reproducible),
    fixes the cuBLAS workspace and turns off cuDNN autotuning; without it nothing global changes."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_bench = torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        small = {**BASE, "model": "mlp", "subset": 100, "method": "standard"}
        train(TrainConfig(**small), tmp_path / "plain", progress=False, log=lambda s: None)
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        torch.backends.cudnn.benchmark = True
        train(TrainConfig(**small, deterministic=True), tmp_path / "det", progress=False, log=lambda s: None)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved_bench


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_deterministic_must_be_a_bool(value: object) -> None:
    with pytest.raises(ConfigError, match="deterministic"):
        TrainConfig(deterministic=value)  # type: ignore[arg-type]
