"""Training end to end on real MNIST, run directories and the training CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustopt.data.datasets import Dataset, to_float
from robustopt.loading import load_model
from robustopt.models.zoo import build_model
from robustopt.tensors import load_tensors
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import perturb
from robustopt.training.config import TrainConfig
from robustopt.training.objectives import make_objective
from robustopt.training.schedules import lr_factor


def fgsm_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    x_adv = perturb(model, x, y, ThreatModel("linf", eps))
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def clean_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_robust_net_resists_fgsm_better_than_standard(standard_run: Path, robust_run: Path, mnist: Dataset) -> None:
    """The paper's first claim, on a real (small) MNIST run: robust training resists FGSM."""
    x, y = to_float(mnist.x_test[:1000]), mnist.y_test[:1000]
    std, rob = load_model(standard_run), load_model(robust_run)
    assert clean_accuracy(std, x, y) > 0.85 and clean_accuracy(rob, x, y) > 0.75
    a_std, a_rob = fgsm_accuracy(std, x, y, 0.2), fgsm_accuracy(rob, x, y, 0.2)
    assert a_rob > a_std + 0.15, (a_rob, a_std)


def test_run_dir_contents(robust_run: Path) -> None:
    cfg = json.loads((robust_run / "config.json").read_text())
    assert cfg["model"] == "paper-mnist" and cfg["train"]["method"] == "robust"
    assert cfg["normalization"] == {"mean": [0.1307], "std": [0.3081]}
    assert "torch" in cfg["versions"]
    lines = [json.loads(s) for s in (robust_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1]
    assert {"loss", "train_acc", "test_acc", "seconds"} <= set(lines[0])


def test_save_load_round_trip_gives_identical_logits(robust_run: Path, mnist_test_batch: tuple) -> None:
    x, _ = mnist_test_batch
    model = load_model(robust_run)
    assert not model.training
    tensors, _ = load_tensors(robust_run / "model.safetensors")
    fresh = build_model("paper-mnist", mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28))
    fresh.load_state_dict(tensors)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
        assert torch.equal(model(x), load_model(robust_run)(x))


def test_standardized_units_convert_with_the_dataset_std() -> None:
    cfg = TrainConfig(eps=0.2, eps_units="standardized")
    assert cfg.pixel_eps == pytest.approx(0.2 * 0.3081)
    assert TrainConfig(eps=0.3).pixel_eps == 0.3


def test_method_defaults() -> None:
    assert TrainConfig(method="goodfellow").clean_weight == 0.5
    assert TrainConfig(method="robust").clean_weight == 0.0
    assert TrainConfig(method="robust", alpha=0.3).clean_weight == 0.3
    assert TrainConfig(method="pgd").inner_steps == 10
    threat = ThreatModel("linf", 0.2)
    assert make_objective("fast", threat).step_size == pytest.approx(0.25)
    assert make_objective("fast", threat).random_start and make_objective("pgd", threat).random_start
    assert make_objective("pgd", threat).step_size == pytest.approx(2.5 * 0.2 / 10)
    assert make_objective("trades", threat).beta == 6.0 and make_objective("trades", threat).steps == 10
    assert make_objective("robust", threat).step_size == 0.2 and not make_objective("robust", threat).random_start


def test_learning_rate_schedules() -> None:
    step = TrainConfig(schedule="step", lr=1.0, lr_step=25, epochs=100)
    assert [step.lr * lr_factor(step, e, 0, 10) for e in (0, 24, 25, 50)] == [1.0, 1.0, 0.5, 0.25]
    cyc = TrainConfig(schedule="onecycle", lr=0.2, epochs=10)
    lrs = [cyc.lr * lr_factor(cyc, e, 0, 10) for e in range(10)]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(0.2) and lrs[-1] < lrs[5]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustopt", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_train_smoke_and_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "mlp"\nmethod = "goodfellow"\neps = "8/255"\nepochs = 1\nsubset = 500\nbatch-size = 50\n')
    out = tmp_path / "run"
    r = run_cli("train", "--config", str(cfg), "--seed", "3", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stderr and r.stderr.startswith("training ")  # logs go to stderr, the first line states the run
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["method"] == "goodfellow" and saved["train"]["seed"] == 3
    assert saved["pixel_eps"] == pytest.approx(8 / 255)
    # A finished run is never overwritten silently.
    again = run_cli("train", "--config", str(cfg), "--out", str(out), "--no-progress")
    assert again.returncode != 0 and "finished run" in again.stderr and "Traceback" not in again.stderr


def test_cli_help_and_bad_flags() -> None:
    assert run_cli("--help").returncode == 0
    bad = run_cli("train", "--norm", "l3", "--out", "/nonexistent/x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("robustopt: error: unknown norm")


def test_train_help_shows_every_config_field_with_its_default() -> None:
    """The options are generated from TrainConfig, so the two cannot drift apart."""
    import dataclasses

    from typer.testing import CliRunner

    from robustopt.cli.app import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "[default: (paper-mnist)]" in text and "[default: (10 for pgd/trades/mart, else 1)]" in text
