"""DDP parity for a user's model on a user's data: torchrun with 2 ranks equals one process with the global batch.

The method is deterministic (2 projected steps, no random start): randomised starts are seeded per rank, so
randomised methods agree with one process only in distribution, not to the bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustopt.loading import load_model
from robustopt.rundir import read_metrics
from test_fit import FACTORY, make_data

LOOPBACK_ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
ARGS = ["--data", "mine.npz", "--model", "ddpnets:build", "--method", "robust", "--steps", "2", "--eps", "8/255",
        "--epochs", "1", "--lr", "0.05", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_torchrun_trains_a_factory_model_on_npz_data_like_one_process(tmp_path: Path) -> None:
    (tmp_path / "ddpnets.py").write_text(FACTORY)
    x, y = make_data(400, 0)
    images = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8, as users store them
    np.savez(tmp_path / "mine.npz", x_train=images[:320], y_train=y[:320].numpy(), x_test=images[320:], y_test=y[320:].numpy())
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(tmp_path)}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "robustopt", "train"]
    proc = subprocess.Popen([*ddp, *ARGS, "--batch-size", "20", "--out", "ddp"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: no orphaned worker outlives the test
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    single = [sys.executable, "-m", "robustopt", "train", *ARGS, "--batch-size", "40", "--out", "single"]
    done = subprocess.run(single, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sys.path.insert(0, str(tmp_path))
    try:
        a, b = load_model(tmp_path / "ddp", trust_code=True), load_model(tmp_path / "single", trust_code=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddpnets", None)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    ddp_row, single_row = read_metrics(tmp_path / "ddp")[0], read_metrics(tmp_path / "single")[0]
    assert ddp_row["loss"] == pytest.approx(single_row["loss"], rel=1e-4)
    assert ddp_row["test_acc"] == pytest.approx(single_row["test_acc"], abs=1e-6)
