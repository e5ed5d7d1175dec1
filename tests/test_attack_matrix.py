"""Every registered attack on every input shape and class count (issue 16): feature vectors, non-square images, K = 2 … 10.

Tiny random models and tiny budgets: the point is that nothing crashes, every output has the
input's shape and lies inside the threat, and an attack never raises the accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from robustopt.evaluation.attacks import ATTACKS, attack_options, run_attack
from robustopt.evaluation.attacks._common import predict
from robustopt.threat.model import ThreatModel

SHAPES = [(20,), (1, 28, 28), (3, 16, 12)]
CLASSES = [2, 3, 10]
BUDGET = {"steps": 2, "n_targets": 2, "queries": 4, "search_steps": 2}  # only the options an attack has are passed
THREATS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
N = 6


def tiny_model(shape: tuple[int, ...], k: int) -> nn.Module:
    """A Linear for feature vectors; conv -> flatten -> linear for images."""
    torch.manual_seed(k)
    if len(shape) == 1:
        return nn.Linear(shape[0], k).eval()
    c, h, w = shape
    return nn.Sequential(nn.Conv2d(c, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * math.ceil(h / 2) * math.ceil(w / 2), k)).eval()  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_on_every_shape_and_class_count(name: str, shape: tuple[int, ...], k: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, *shape, generator=g), torch.randint(0, k, (N,), generator=g)
    model = tiny_model(shape, k)
    y[:3] = predict(model, x[:3])  # some correctly classified points, so the attack has work to do
    norm = ("linf", "l2", "l1")[(len(name) + k) % 3]  # spread the norms over the matrix without tripling it
    threat = ThreatModel(norm, THREATS[norm])
    options = {key: v for key, v in BUDGET.items() if key in attack_options(name)}
    if "generator" in attack_options(name):
        options["generator"] = torch.Generator().manual_seed(1)
    x_adv = run_attack(model, x, y, threat, name, **options)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert bool(threat.contains(x_adv, x, atol=1e-5).all())
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())
    clean = predict(model, x) == y
    robust = clean & (predict(model, x_adv) == y)
    assert robust.sum() <= clean.sum()


@pytest.mark.parametrize("name", ["apgd-dlr", "auto", "autoattack", "fab-t"])
def test_targeted_attacks_run_on_two_classes_with_one_target(name: str) -> None:
    """K = 2: one target, the other class (the reference's DLR needs a 3rd logit and failed with IndexError)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 2).eval()
    x = torch.rand(16, 5) * 0.2 + 0.4
    y = predict(model, x)
    threat = ThreatModel("linf", 0.5)  # large: a linear two-class model breaks everywhere
    options = {key: v for key, v in {"steps": 10, "n_targets": 9, "queries": 20}.items() if key in attack_options(name)}
    x_adv = run_attack(model, x, y, threat, name, **options)
    assert float((predict(model, x_adv) == y).float().mean()) < 0.5
