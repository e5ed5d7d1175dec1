"""A run directory is a transaction: one writer at a time (an OS lock), checks before any deletion,
stray temporaries cleaned on --resume / --overwrite, and Ctrl-C reported with the way to continue.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustopt import cli
from robustopt.errors import RunDirError
from robustopt.loading import load_model
from robustopt.rundir import LOCK, SET_ASIDE, RunLock, check_run_dir, read_metrics, restore_set_aside, stray_tmp_files
from robustopt.tensors import load_tensors

TRAIN = ["train", "--model", "mlp", "--subset", "300", "--epochs", "1", "--no-progress"]
cli_app = importlib.import_module("robustopt.cli.app")

pytestmark = pytest.mark.usefixtures("one_thread")


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("ROBUSTOPT_DATA", "ROBUSTOPT_DEBUG"):
        env.pop(key, None)
    return env


def run_main(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    code = info.value.code
    return (0 if code is None else code), capsys.readouterr().err


# ---------------------------------------------------------------- the lock


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=rf"another robustopt process is writing .*run \(pid {os.getpid()}\)"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK).exists()  # released: the run directory holds only run files
    with RunLock(tmp_path / "run"):  # and it can be taken again
        pass


def test_stale_lock_file_of_a_dead_process_is_no_obstacle(tmp_path: Path) -> None:
    """SIGKILL leaves the .lock file behind, but the kernel has dropped the lock with the process."""
    (tmp_path / LOCK).write_text("999999\n")
    with RunLock(tmp_path):
        assert (tmp_path / LOCK).read_text().strip() == str(os.getpid())


def test_train_refused_while_another_writer_holds_the_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    with RunLock(out):
        code, err = run_main([*TRAIN, "--out", out], capsys)
    assert code == 2 and "another robustopt process is writing" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []  # the refused writer wrote nothing


def test_two_writers_one_out(tmp_path: Path) -> None:
    """Two ``train`` processes started together into one new --out: exactly one is refused, the other's run is whole."""
    out, env = tmp_path / "run", _env(tmp_path)
    args = [*TRAIN, "--subset", "2000", "--epochs", "2", "--out", str(out)]
    cmd = [sys.executable, "-m", "robustopt", *args]
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    survivor_seed = 1 if results[0][0] == 0 else 2
    refused = next(err for code, err in results if code == 2)
    assert "another robustopt process is writing" in refused or "already holds" in refused, refused
    # The survivor's run is whole and all of it is the survivor's: config, metrics, checkpoint and weights.
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors",
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "summary.json",
    ]
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == survivor_seed
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    _, meta = load_tensors(out / "checkpoint.safetensors")
    assert meta["progress"]["epoch"] == 2 and meta["config"]["seed"] == survivor_seed
    load_model(out)


# ---------------------------------------------------------------- checks before deletion


def test_check_run_dir_is_pure(tmp_path: Path) -> None:
    """The check deletes nothing, whatever it is asked: overwrite only says 'do not resume'."""
    (tmp_path / "config.json").write_text(json.dumps({"train": {"seed": 0}}))
    (tmp_path / "summary.json").write_text("{}")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert check_run_dir(tmp_path, {"seed": 0}, resume=False, overwrite=True) is False
    with pytest.raises(RunDirError, match="finished run"):
        check_run_dir(tmp_path, {"seed": 0}, resume=True, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == files


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_stray_tmp_files_are_cleaned(flag: str, tmp_path: Path, capsys) -> None:
    """A kill during an atomic write leaves ``.<name>.<random>.tmp``; --resume and --overwrite remove it."""
    out = tmp_path / "run"
    assert run_main([*TRAIN, "--out", out], capsys)[0] == 0
    (out / "summary.json").unlink()  # unfinished, so that --resume is allowed
    stray = [out / ".checkpoint.safetensors.k3j2.tmp", out / ".model.safetensors.x9.tmp"]
    for p in stray:
        p.write_bytes(b"half a write")
    (out / "notes.tmp").write_text("not ours")
    assert stray_tmp_files(out) == sorted(stray)
    code, err = run_main([*TRAIN, "--out", out, flag], capsys)
    assert code == 0, err
    assert stray_tmp_files(out) == [] and (out / "notes.tmp").exists()


# ---------------------------------------------------------------- Ctrl-C


SIGNALS = {  # signal: (exit code 128 + signum, how the line starts)
    signal.SIGINT: (130, "robustopt: interrupted;"),
    signal.SIGTERM: (143, "robustopt: stopped by SIGTERM;"),
}


@pytest.mark.parametrize("sig", list(SIGNALS), ids=lambda s: s.name)
def test_a_signal_through_typer_says_how_to_continue(sig: signal.Signals, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (kill, a scheduler's time limit) while a command runs, typer in between:
    exit 128 + signum and the --resume hint, not typer's silent 130 or a silent death."""
    import robustopt.training.named as named

    before = signal.getsignal(sig)

    def interrupted_train(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError(f"{sig.name} was not delivered")

    monkeypatch.setattr(named, "train", interrupted_train)
    code, err = run_main(TRAIN, capsys)
    want_code, start = SIGNALS[sig]
    assert code == want_code
    assert err.strip() == f"{start} finished epochs and checkpoints are kept (use --resume)"
    assert signal.getsignal(sig) is before  # restored afterwards


@pytest.mark.slow
@pytest.mark.parametrize("sig", list(SIGNALS), ids=lambda s: s.name)
def test_a_signal_to_a_real_process_then_resume(sig: signal.Signals, tmp_path: Path) -> None:
    """A real ``robustopt train`` stopped mid-epoch by SIGINT or SIGTERM prints the hint, leaves no lock or
    temporary file, and --resume then finishes the run."""
    out, env = tmp_path / "run", _env(tmp_path)
    args = [sys.executable, "-m", "robustopt", *TRAIN, "--subset", "3000", "--epochs", "2", "--out", str(out)]
    proc = subprocess.Popen([*args, "--checkpoint-minutes", "0.0002"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.01)
    proc.send_signal(sig)
    want_code, start = SIGNALS[sig]
    assert proc.wait(timeout=60) == want_code
    err = proc.stderr.read()
    assert start in err and "--resume" in err and "Traceback" not in err, err
    assert not list(out.glob(".*.tmp")) and not (out / LOCK).exists()
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_empty_path_options_are_refused_before_anything_runs(tmp_path: Path, capsys) -> None:
    for argv in (["download", "mnist", "--dest", ""], [*TRAIN, "--data-dir="], [*TRAIN, "--config", " "]):
        code, err = run_main(argv, capsys)
        assert code == 2 and "is empty" in err, err
    assert cli_app.PATH_OPTIONS  # the list the check uses


# ---------------------------------------------------------------- --overwrite sets the old run aside


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_overwrite_that_fails_in_its_first_epoch_gives_the_finished_run_back(tmp_path: Path, capsys) -> None:
    """The new run passes every check and then diverges in epoch 1: the finished run it replaced comes back whole."""
    out = tmp_path / "run"
    code, err = run_main([*TRAIN, "--out", out], capsys)
    assert code == 0, err
    before = _snapshot(out)
    code, err = run_main([*TRAIN, "--out", out, "--overwrite", "--lr", "1e30"], capsys)
    assert code == 2 and "diverged" in err, err
    assert _snapshot(out) == before
    assert not (out / SET_ASIDE).exists()


def test_overwrite_drops_the_old_run_once_an_epoch_is_done(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run_main([*TRAIN, "--out", out], capsys)[0] == 0
    old = load_tensors(out / "model.safetensors")[0]
    code, err = run_main([*TRAIN, "--out", out, "--overwrite", "--seed", "7"], capsys)
    assert code == 0, err
    assert not (out / SET_ASIDE).exists()
    new = load_tensors(out / "model.safetensors")[0]
    assert any(not (old[k] == new[k]).all() for k in old)  # really the new run's weights
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 7


@pytest.mark.slow
def test_a_killed_overwrite_is_undone_by_the_next_command(tmp_path: Path, capsys) -> None:
    """SIGKILL during an --overwrite's first epoch leaves the old run set aside; the next command into the
    directory puts it back before anything else, so the finished run is never lost."""
    out, env = tmp_path / "run", _env(tmp_path)
    assert run_main([*TRAIN, "--out", out], capsys)[0] == 0
    before = _snapshot(out)
    args = [sys.executable, "-m", "robustopt", *TRAIN, "--subset", "20000", "--out", str(out), "--overwrite"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ((out / SET_ASIDE / "config.json").exists() and (out / "config.json").exists()):  # the new run has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    assert (out / SET_ASIDE).is_dir() and "summary.json" not in _snapshot(out)  # killed mid-replacement
    code, err = run_main([*TRAIN, "--out", out], capsys)  # no flag: restores, then refuses the finished run
    assert code == 2 and "already holds a finished run" in err, err
    assert _snapshot(out) == before
    assert not (out / SET_ASIDE).exists()


def test_a_kill_in_the_middle_of_setting_aside_loses_nothing(tmp_path: Path, capsys) -> None:
    """Killed after moving some files aside and before config.json: the rest is still the old run's."""
    out = tmp_path / "run"
    assert run_main([*TRAIN, "--out", out], capsys)[0] == 0
    before = _snapshot(out)
    (out / SET_ASIDE).mkdir()
    for name in ("summary.json", "model.safetensors"):  # the order replace_run moves them in
        os.replace(out / name, out / SET_ASIDE / name)
    assert restore_set_aside(out)
    assert _snapshot(out) == before and not (out / SET_ASIDE).exists()
