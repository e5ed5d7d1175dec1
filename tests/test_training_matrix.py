"""Every training method on every input shape and class count (issue 16): feature vectors (20,), images (1, 28, 28)
and non-square colour images (3, 16, 12), K = 2, 3 and 10, on tiny models, through the public ``fit``; each run
trains, writes its run directory and reloads. The attack side of the matrix is tests/test_attack_matrix.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from robustopt import ThreatModel, TrainConfig, evaluate, fit, load_model
from robustopt.training.objectives import METHODS

SHAPES = [(20,), (1, 28, 28), (3, 16, 12)]
CLASSES = [2, 3, 10]


def _model(shape: tuple[int, ...], k: int) -> nn.Module:
    torch.manual_seed(0)
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], 8), nn.ReLU(), nn.Linear(8, k))
    c, h, w = shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * ((h + 1) // 2) * ((w + 1) // 2), k))  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_any_shape_and_class_count_and_reloads(method: str, shape: tuple[int, ...], k: int,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(k)
    x, y = torch.rand(32, *shape, generator=g), torch.arange(32) % k
    model = _model(shape, k)
    threat = ThreatModel("linf", 0.05)
    cfg = TrainConfig(replays=2, sigma=0.1 if method == "gaussian" else None)
    summary = fit(model, (x, y), threat, out=tmp_path, method=method, epochs=1, batch_size=16, steps=2, config=cfg,
                  test_data=(x[:8], y[:8]), log=lambda s: None)  # fmt: skip
    assert summary.epochs == 1 and summary.test_acc is not None and 0.0 <= summary.test_acc <= 1.0
    again = load_model(tmp_path, model=_model(shape, k))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_default_evaluation_with_its_sanity_checks_on_two_classes(shape: tuple[int, ...]) -> None:
    """The default light checks include the Square attack, which once crashed on flat features."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, *shape, generator=g), torch.arange(24) % 2
    res = evaluate(_model(shape, 2), x, y, ThreatModel("linf", 0.05), progress=False)
    assert res.sanity is not None and "whitebox_vs_blackbox" in res.sanity and res.adversarial_accuracy <= res.clean_accuracy
