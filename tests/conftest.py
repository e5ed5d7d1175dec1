"""Shared fixtures: small real MNIST slices and a briefly trained paper-mnist model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from robustopt.data.datasets import Dataset, load_dataset, to_float
from robustopt.training.config import TrainConfig

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_test_batch(mnist: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """First 200 test images as float [0,1] (200, 1, 28, 28) and labels (200,)."""
    return to_float(mnist.x_test[:200]), mnist.y_test[:200]


def _train(tmp: Path, method: str, eps: float = 0.2) -> Path:
    from robustopt.training.named import train

    cfg = TrainConfig(method=method, eps=eps, epochs=1, subset=6000, batch_size=50, seed=0, lr=0.05)
    train(cfg, tmp, progress=False, log=lambda s: None)
    return tmp


@pytest.fixture(scope="session")
def standard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paper-mnist run trained with method=standard on 6k images for one epoch (~5 s)."""
    return _train(tmp_path_factory.mktemp("standard"), "standard")


@pytest.fixture(scope="session")
def robust_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paper-mnist run trained with method=robust, linf eps 0.2, on 6k images for one epoch."""
    return _train(tmp_path_factory.mktemp("robust"), "robust")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: on an oversubscribed machine two spinning OpenMP threads are ~10x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
