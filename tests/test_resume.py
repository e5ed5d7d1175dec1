"""Nothing lost on a crash: ``kill -9`` mid-training, then ``--resume``, ends bit-identical to an uninterrupted run.

Each scenario starts ``python -m robustopt train`` with a checkpoint every few milliseconds and
sends SIGKILL as soon as a checkpoint exists (in the middle of epoch 1). The MLP scenario resumes,
is killed again once epoch 1 has finished (possibly in the middle of a checkpoint write), and
resumes to completion. An uninterrupted run with the same seed, which never checkpoints
mid-epoch, runs alongside. On CPU the final weights must agree exactly (max |Δ| = 0) and so must
every metric but the timings: data order, weights, optimiser momentum, BatchNorm statistics,
every RNG stream (random starts, dropout) and the running loss/accuracy sums survive the kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from _datafiles import tiny_arrays, write_npz
from robustopt.tensors import load_tensors

FAST_CHECKPOINTS = ["--checkpoint-minutes", "0.0002"]  # 12 ms: a checkpoint after nearly every batch


def _env(tmp: Path) -> dict[str, str]:
    # One intra-op thread: on a shared, oversubscribed machine OpenMP's spinning threads slow a run by 10-50x.
    # Every run of a comparison gets the same environment, so this does not bias it.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("ROBUSTOPT_DATA", None)
    env.pop("ROBUSTOPT_DEBUG", None)
    return env


def _launch(args: list[str], out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "robustopt", "train", *args, "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ends (or stalls) first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _progress(out: Path) -> dict:
    """The last checkpoint's position; loading it also proves it survived the kill intact (hash checked)."""
    _, meta = load_tensors(out / "checkpoint.safetensors")
    return meta["progress"]


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _max_abs_diff(a: Path, b: Path) -> float:
    ta, _ = load_tensors(a / "model.safetensors")
    tb, _ = load_tensors(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    return max(float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0 for k in ta)


def kill_and_resume(args: list[str], tmp: Path, kill_again: bool) -> tuple[float, list[dict], Path, Path]:
    """Kill mid epoch 1, resume (and when ``kill_again``, kill again once epoch 1 is done), resume to the end.

    Returns (max |Δweight| against the uninterrupted run, the checkpoint positions at the kills,
    the resumed run dir, the reference run dir).
    """
    env = _env(tmp)
    ref, victim = tmp / "reference", tmp / "victim"
    reference = _launch(args, ref, env)  # default interval: only end-of-epoch checkpoints
    ckpt = victim / "checkpoint.safetensors"

    proc = _launch(args, victim, env, *FAST_CHECKPOINTS)
    _kill_when(proc, ckpt.exists)  # the first checkpoint: mid epoch 1
    positions = [_progress(victim)]
    if kill_again:
        proc = _launch(args, victim, env, *FAST_CHECKPOINTS, "--resume")
        _kill_when(proc, lambda: (victim / "metrics.jsonl").exists() and _sleep(0.15))  # at or after the end of epoch 1
        positions.append(_progress(victim))

    done = subprocess.run(
        [sys.executable, "-m", "robustopt", "train", *args, "--out", str(victim), "--no-progress", "--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    return _max_abs_diff(victim, ref), positions, victim, ref


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def _check(args: list[str], tmp: Path, kill_again: bool) -> None:
    diff, positions, victim, ref = kill_and_resume(args, tmp, kill_again)
    assert positions[0]["epoch"] == 0 and positions[0]["batch"] > 0, positions[0]  # the first kill really was mid-epoch
    if kill_again:  # the second kill came later, with the end of epoch 1 at least partly done
        assert (positions[1]["epoch"], positions[1]["batch"]) > (0, positions[0]["batch"]), positions
    assert diff == 0.0
    assert _metrics(victim) == _metrics(ref)  # loss and accuracies: the running sums survived too
    assert (victim / "summary.json").exists()


@pytest.mark.slow
def test_sigkill_resume_mlp_pgd_is_bit_identical(tmp_path: Path) -> None:
    """MLP, PGD training (random starts from the seeded generator), 2 epochs of 2000 MNIST images."""
    args = ["--model", "mlp", "--method", "pgd", "--steps", "2", "--eps", "0.1", "--subset", "2000", "--epochs", "2"]
    _check([*args, "--batch-size", "50", "--seed", "3", "--lr", "0.05", "--schedule", "onecycle"], tmp_path, True)


@pytest.mark.slow
def test_sigkill_resume_paper_cifar_dropout_is_bit_identical(tmp_path: Path) -> None:
    """paper-cifar has dropout (the global RNG) and BatchNorm running statistics; tiny synthetic 32×32 data keeps it fast."""
    data = tmp_path / "data"
    write_npz(data / "cifar10.npz", tiny_arrays((32, 32, 3), n_train=48, n_test=16, seed=5))
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--model", "paper-cifar", "--method", "robust"]
    _check([*args, "--eps", "8/255", "--epochs", "1", "--batch-size", "8", "--seed", "1"], tmp_path, False)


def test_reference_differs_from_other_seed_sanity(tmp_path: Path) -> None:
    """Control for the comparisons above: the weight comparison does see differences when there are any."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seed in ((a, 0), (b, 1)):
        d.mkdir()
        torch.manual_seed(seed)
        from robustopt.tensors import save_tensors

        save_tensors(d / "model.safetensors", {"w": torch.randn(4)})
    assert _max_abs_diff(a, b) > 0
