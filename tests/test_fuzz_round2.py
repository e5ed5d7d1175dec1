"""The second round of hostile inputs (issue 16): every class of input that once ended in "internal error" or a raw
exception, at the CLI (one ``robustopt: error:`` line, non-zero exit, earlier results untouched) and at the public API
(a typed :class:`RobustoptError`). The module's last test counts both over every case and asserts zero."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from robustopt import RobustoptError, ThreatModel, evaluate, fit, load_model, robust_loss
from robustopt.training.config import TrainConfig
from robustopt.training.named import train

pytestmark = pytest.mark.usefixtures("one_thread")
TALLY = {"cases": 0, "internal_error": 0, "raw_exception": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("round2") / "run"
    train(TrainConfig(model="mlp", subset=300, epochs=1), out, progress=False, log=lambda s: None)
    return out


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "robustopt", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=full_env)  # fmt: skip


def _one_line(p: subprocess.CompletedProcess[str], contains: str) -> None:
    TALLY["cases"] += 1
    TALLY["internal_error"] += "internal error" in p.stderr
    TALLY["raw_exception"] += "Traceback" in p.stderr
    lines = [s for s in p.stderr.splitlines() if s.strip() and not s.startswith("training ")]
    assert p.returncode != 0 and "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("robustopt: error: "), p.stderr
    assert contains in lines[0], lines[0]


def _typed(call: Callable[[], object], contains: str) -> None:
    TALLY["cases"] += 1
    try:
        call()
    except RobustoptError as e:
        assert contains in str(e) and "\n" not in str(e), str(e)
        return
    except BaseException:
        TALLY["raw_exception"] += 1
        raise
    raise AssertionError(f"no error for a case expecting {contains!r}")


def _edited_config(run: Path, tmp_path: Path, **fields: object) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(fields)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


EVAL = ["--attack", "fgsm", "--subset", "5", "--no-sanity", "--no-progress"]


def test_huge_seed(run: Path, tmp_path: Path) -> None:
    _one_line(_cli(["evaluate", run, *EVAL, "--seed", "99999999999999999999"], tmp_path), "seed")
    _one_line(_cli(["train", "--model", "mlp", "--subset", "100", "--seed", "99999999999999999999", "--out", "r"], tmp_path),
              "seed")  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "contains"),
    [
        ({"num_classes": "ten"}, "num_classes"),
        ({"threat": "linf"}, "--eps is needed"),
        ({"dataset": 5}, "not a robustopt run configuration"),
        ({"normalization": {"mean": "a", "std": [1]}}, "normalization"),
        ({"model": "os:system", "model_kwargs": {"command": "touch PWNED"}}, "trust-code"),
    ],
)
def test_wrongly_typed_or_foreign_config_json(run: Path, tmp_path: Path, fields: dict, contains: str) -> None:
    edited = _edited_config(run, tmp_path, **fields)
    _one_line(_cli(["evaluate", edited, *EVAL], tmp_path), contains)
    assert not (tmp_path / "PWNED").exists()  # a recorded factory never runs without consent


def test_stability_of_a_factory_run_needs_consent(run: Path, tmp_path: Path) -> None:
    edited = _edited_config(run, tmp_path, model="os:system", model_kwargs={"command": "touch PWNED"})
    _one_line(_cli(["stability", edited, "--subset", "4", "--no-progress"], tmp_path), "trust-code")
    assert not (tmp_path / "PWNED").exists()


def test_partial_over_another_runs_config_is_refused_and_untouched(run: Path, tmp_path: Path) -> None:
    before = (run / "config.json").read_bytes()
    _one_line(_cli(["evaluate", run, *EVAL, "--partial", run / "config.json"], tmp_path), "not a robustopt partial result")
    assert (run / "config.json").read_bytes() == before


def test_robustbench_json_path_is_checked_before_the_attack(run: Path, tmp_path: Path) -> None:
    args = ["evaluate", run, "--attack", "autoattack", "--subset", "5", "--robustbench-json", tmp_path / "no" / "card.json"]
    _one_line(_cli(args, tmp_path), "cannot write there")


@pytest.mark.parametrize("kind", ["binary", "huge"])
def test_config_that_is_a_binary_or_huge_file(tmp_path: Path, kind: str) -> None:
    cfg = tmp_path / "recipe.toml"
    if kind == "binary":
        cfg.write_bytes(bytes(range(256)) * 4)
    else:
        with open(cfg, "wb") as f:  # 3 GB, sparse: nothing is allocated
            f.truncate(3 << 30)
    _one_line(_cli(["train", "--config", cfg, "--out", "r"], tmp_path), "config file")


def test_a_factory_that_calls_sys_exit_is_an_error_not_a_success(tmp_path: Path) -> None:
    (tmp_path / "quitter.py").write_text("import sys\ndef build():\n    sys.exit(0)\n")
    p = _cli(["train", "--model", "quitter:build", "--subset", "100", "--out", "r"], tmp_path, {"PYTHONPATH": str(tmp_path)})
    _one_line(p, "SystemExit")


def test_stability_of_a_pretrained_model_creates_no_folder_named_after_it(tmp_path: Path) -> None:
    p = _cli(["stability", "pretrained:mnist-linf-0.3", "--subset", "3", "--no-progress", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert not any(":" in q.name for q in tmp_path.iterdir()) and (tmp_path / "stability_l2_deepfool.png").is_file()


def test_npz_with_object_class_names_and_an_encrypted_member(tmp_path: Path) -> None:
    x = np.zeros((20, 4, 4), np.uint8)
    y = np.arange(20) % 2
    np.savez(tmp_path / "obj.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["a", None], dtype=object))
    _one_line(_cli(["train", "--data", tmp_path / "obj.npz", "--model", "mlp", "--out", "r"], tmp_path), "class_names")
    np.savez(tmp_path / "plain.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with zipfile.ZipFile(tmp_path / "plain.npz") as z:
        info = z.infolist()
    raw = bytearray((tmp_path / "plain.npz").read_bytes())
    for i in info:  # set the "encrypted" flag bit in each local header and central directory entry
        raw[i.header_offset + 6] |= 1
    cd = raw.find(b"PK\x01\x02")
    while cd != -1:
        raw[cd + 8] |= 1
        cd = raw.find(b"PK\x01\x02", cd + 4)
    (tmp_path / "enc.npz").write_bytes(bytes(raw))
    _one_line(_cli(["train", "--data", tmp_path / "enc.npz", "--model", "mlp", "--out", "r"], tmp_path), "encrypted")


def test_a_data_set_that_gained_classes(tmp_path: Path) -> None:
    x = (np.random.default_rng(0).random((60, 4, 4)) * 255).astype(np.uint8)
    y = np.arange(60) % 3
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x, y_test=y)
    done = _cli(["train", "--data", data, "--model", "mlp", "--epochs", "1", "--out", "r"], tmp_path)
    assert done.returncode == 0, done.stderr
    np.savez(data, x_train=x, y_train=np.arange(60) % 5, x_test=x, y_test=np.arange(60) % 5)
    _one_line(_cli(["evaluate", "r", *EVAL], tmp_path), "classes")


class _DictData(TorchDataset):
    def __init__(self, key: str) -> None:
        self.key = key

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.rand(4), self.key: i % 2}


def test_api_bad_calls_are_typed_one_line_errors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    x, y = torch.rand(8, 4), torch.arange(8) % 2
    t = ThreatModel("linf", 0.1)
    _typed(lambda: robust_loss(model, x, y + 5, t), "labels")
    _typed(lambda: robust_loss(model, x, y, None), "threat")  # type: ignore[arg-type]
    _typed(lambda: evaluate(model, x, y - 3, t, progress=False), "labels")
    _typed(lambda: evaluate(model, x, y, t, "pgd", options={"stpes": 3}, progress=False), "stpes")
    _typed(lambda: load_model(None), "run_dir")  # type: ignore[arg-type]
    _typed(lambda: load_model("pretrained:mnist-linf-0.3", device="cuda:7"), "cuda")
    _typed(lambda: ThreatModel("l3", 0.1), "norm")
    _typed(lambda: ThreatModel("linf", -0.1), "eps")
    _typed(lambda: fit(model, _DictData("weird_key"), t, out=tmp_path / "d", epochs=1, log=lambda s: None), "train_data")
    fit(model, _DictData("label"), t, out=tmp_path / "ok", epochs=1, log=lambda s: None)  # a dict Dataset works


def test_zero_internal_errors_and_zero_raw_exceptions_over_the_module() -> None:
    """Runs last in this module: the counts of every case above."""
    assert TALLY["cases"] >= 20, TALLY
    print(f"\nround-2 fuzz: {TALLY['cases']} cases, {TALLY['internal_error']} internal errors, "
          f"{TALLY['raw_exception']} raw exceptions")  # fmt: skip
    assert TALLY["internal_error"] == 0 and TALLY["raw_exception"] == 0, TALLY
