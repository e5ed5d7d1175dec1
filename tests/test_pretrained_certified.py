"""The shipped certified model ``pretrained:mnist-linf-0.3-certified`` (recipes/mnist-linf-0.3-certified.toml).

It loads offline from the package's own files, is small enough for the wheel, rebuilds by name (``ibp-cnn``, no
trust_code), and its verified accuracy at ℓ∞ ε = 0.3 on the first 200 test images is the one measured when it was
shipped (IBP and CROWN-IBP bounds are deterministic; the tolerance only absorbs float summation order)."""

from __future__ import annotations

import json

import pytest
import torch

import robustopt.pretrained as pretrained
from robustopt import ThreatModel, load_pretrained
from robustopt.certify import certify
from robustopt.data.datasets import Dataset, to_float

NAME = "mnist-linf-0.3-certified"
# Measured on the shipped weights, first 200 MNIST test images, ℓ∞ ε = 0.3 (all 10,000: clean 97.00%, IBP and
# CROWN-IBP verified 85.69%, PGD-40 91.31%; docs/certify.md).
FIRST_200 = {"clean": 0.99, "ibp": 0.865, "crown-ibp": 0.865}


def test_the_certified_model_ships_and_rebuilds_by_name() -> None:
    run = pretrained.pretrained_dir(NAME)
    assert NAME in pretrained.list_pretrained()
    assert sum(p.stat().st_size for p in run.iterdir()) < 5_000_000  # small enough to ship in the wheel
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["model"], train["method"], train["eps"]) == ("ibp-cnn", "ibp", 0.3)


def test_the_certified_model_is_verified_offline(mnist: Dataset, one_thread: None) -> None:
    model = load_pretrained(f"pretrained:{NAME}")
    assert not model.training
    x, y = to_float(mnist.x_test[:200]), mnist.y_test[:200]
    threat = ThreatModel("linf", 0.3)
    ibp = certify(model, x, y, threat, "ibp")
    crown = certify(model, x, y, threat, "crown-ibp")
    assert ibp.clean_accuracy == pytest.approx(FIRST_200["clean"], abs=0.006)
    assert ibp.verified_accuracy == pytest.approx(FIRST_200["ibp"], abs=0.006)  # one image of 200 either way
    assert crown.verified_accuracy == pytest.approx(FIRST_200["crown-ibp"], abs=0.006)
    assert crown.verified_accuracy >= ibp.verified_accuracy  # CROWN-IBP's reported bound is max(CROWN-IBP, IBP)
    with torch.no_grad():  # verified images are classified correctly
        assert bool((model(x[ibp.verified]).argmax(1) == y[ibp.verified]).all())
