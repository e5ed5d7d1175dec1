"""scripts/ablation_mnist.py's bookkeeping: the recipe at another budget, and refusing a run of another configuration."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

from robustopt.recipes import load_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablation_mnist.py"
spec = importlib.util.spec_from_file_location("ablation_mnist", SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_a_shorter_budget_scales_the_ramp_and_the_milestones() -> None:
    full = load_recipe("mnist-linf-0.3-strong")
    half = ablation.budget(full, full.epochs // 2, None)
    assert half.epochs == full.epochs // 2
    assert half.eps_ramp_epochs == full.eps_ramp_epochs * half.epochs / full.epochs
    assert half.milestones == sorted({max(1, round(m * half.epochs / full.epochs)) for m in full.milestones})
    assert all(1 <= m <= half.epochs for m in half.milestones)


def _recorded_run(run: Path, cfg, **changes) -> None:
    """A run directory whose config.json records ``cfg`` with ``changes``, as training writes it."""
    run.mkdir(exist_ok=True)
    recorded = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    (run / "config.json").write_text(json.dumps({"train": {**recorded, **changes}}))


def test_a_run_of_another_configuration_is_reported_key_by_key(tmp_path: Path) -> None:
    cfg = ablation.budget(load_recipe("mnist-linf-0.3-strong"), 1, None)
    assert ablation.changed_keys(cfg, tmp_path / "new") == {}  # nothing trained there yet
    run = tmp_path / "recipe"
    _recorded_run(run, cfg)
    assert ablation.changed_keys(cfg, run) == {}
    _recorded_run(run, cfg, eps_ramp_epochs=0.5, epochs=3)
    assert ablation.changed_keys(cfg, run) == {"eps_ramp_epochs": (0.5, cfg.eps_ramp_epochs), "epochs": (3, 1)}


def test_main_refuses_a_stale_variant_in_one_line(tmp_path: Path, capsys) -> None:
    cfg = ablation.budget(load_recipe("mnist-linf-0.3-strong"), 1, None)
    run = tmp_path / "recipe"
    _recorded_run(run, cfg, label_smoothing=0.2)
    (run / "summary.json").write_text("{}")
    threads = torch.get_num_threads()  # main() sets --threads (1) for its timings; give the test session its own back
    try:
        rc = ablation.main(["--out", str(tmp_path), "--epochs", "1", "--variants", "recipe", "--doc", str(tmp_path / "d.md")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label_smoothing 0.2 (now 0.0)" in err
    assert not (tmp_path / "d.md").exists()


def test_main_refuses_a_thread_count_below_one_before_anything_runs(tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    rc = ablation.main(["--out", str(tmp_path / "abl"), "--threads", "0", "--doc", str(tmp_path / "d.md")])
    assert rc == 2 and torch.get_num_threads() == threads
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--threads must be >= 1, got 0" in err
    assert not (tmp_path / "abl").exists() and not (tmp_path / "d.md").exists()
