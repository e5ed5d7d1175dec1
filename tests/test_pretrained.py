"""Shipped models: load_pretrained(name) and load_model("pretrained:NAME"), offline, from the package's own files.

Until the real ``mnist-linf-0.3`` is trained and committed, the loader is tested on a placeholder run trained here
(a tiny MLP, one epoch on 600 images); the test of the real model runs as soon as its files are in the package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import robustopt.pretrained as pretrained
from robustopt import ConfigError, ThreatModel, TrainConfig, load_model, load_pretrained, train
from robustopt.cli.app import main
from robustopt.data.datasets import Dataset, to_float


@pytest.fixture(scope="module")
def placeholder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained/ folder holding one finished run named mnist-linf-0.3 (a placeholder, not the real model)."""
    root = tmp_path_factory.mktemp("pretrained")
    cfg = TrainConfig(model="mlp", method="pgd", eps=0.3, steps=2, epochs=1, subset=600, test_subset=200, seed=0)
    train(cfg, root / "mnist-linf-0.3", progress=False, log=lambda _: None)
    (root / "not-a-model").mkdir()  # a folder without weights is not listed
    return root


def test_load_pretrained_and_the_load_model_hook(
    placeholder_root: Path, monkeypatch: pytest.MonkeyPatch, mnist_test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    assert pretrained.list_pretrained(placeholder_root) == ["mnist-linf-0.3"]
    x, _ = mnist_test_batch
    model = load_pretrained("mnist-linf-0.3", root=placeholder_root)
    assert not model.training and model(x[:5]).shape == (5, 10)
    monkeypatch.setattr(pretrained, "pretrained_root", lambda: placeholder_root)
    for hooked in (load_model("pretrained:mnist-linf-0.3"), load_pretrained("pretrained:mnist-linf-0.3")):
        assert torch.equal(hooked(x), model(x))  # the same weights, by either name
    with pytest.raises(ConfigError, match="unknown pretrained model 'mnist-linf-0.4'.*shipped models are mnist-linf-0.3"):
        load_model("pretrained:mnist-linf-0.4")


def test_cli_evaluates_a_pretrained_name(
    placeholder_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(pretrained, "pretrained_root", lambda: placeholder_root)
    argv = ["evaluate", "pretrained:mnist-linf-0.3", "--attack", "fgsm", "--eps", "0.3", "--subset", "50", "--no-sanity"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code in (0, None), err
    assert "clean accuracy" in out
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "pretrained:nope", "--eps", "0.3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "mnist-linf-0.3" in err


def test_the_shipped_mnist_model_is_robust_offline(mnist: Dataset) -> None:
    from robustopt.evaluation.attacks import run_attack

    model = load_pretrained("mnist-linf-0.3")
    size = sum(p.stat().st_size for p in pretrained.pretrained_dir("mnist-linf-0.3").iterdir())
    assert size < 5_000_000  # small enough to ship in the wheel
    x, y = to_float(mnist.x_test[:200]), mnist.y_test[:200]
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.98
    x_adv = run_attack(model, x, y, ThreatModel("linf", 0.3), "pgd", steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() >= 0.85
