"""Distributed runs that cannot hang (issue 16): a configuration mismatch is refused at start-up, and a
dead or stuck peer ends the run with one clear line, the last checkpoint intact.

Before: torchrun ranks started with ``--subset 4000`` and ``--subset 1000`` ran different numbers of
batches, their collectives stopped pairing up, and both waited for more than 12 minutes, deaf to SIGTERM
and Ctrl-C (Python runs signal handlers only between bytecodes, not inside a blocking collective).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from robustopt.errors import ConfigError, RobustoptError
from robustopt.tensors import load_tensors
from robustopt.training import distributed as rdist

WORLD = 2
ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
TRAIN = ["train", "--model", "mlp", "--method", "standard", "--epochs", "1", "--test-subset", "200", "--device", "cpu",
         "--no-progress"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float, **kw: object) -> tuple[subprocess.CompletedProcess, float]:
    """Run in its own session; on timeout kill the whole group (torchrun and its ranks), so none outlives the test."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (the hang issue 16 is about): {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t0


# ---------------------------------------------------------------------------- pieces, in one process


def test_the_message_names_the_ranks_and_keys_that_differ() -> None:
    base = {"subset": 4000, "lr": 0.1, "test_data": {"n": 200}, "data_fingerprint": "aa"}
    msg = rdist.mismatch_message([base, {**base, "subset": 1000, "data_fingerprint": "bb"}, base, {**base, "lr": 0.2}])
    assert "\n" not in msg
    assert "rank 1 differs from rank 0 in subset (4000 on rank 0, 1000 on rank 1), data_fingerprint" in msg
    assert "rank 3 differs from rank 0 in lr (0.1 on rank 0, 0.2 on rank 3)" in msg
    assert "rank 2" not in msg and msg.endswith("start every rank with the same arguments and data")
    two = rdist.mismatch_message([base, {**base, "lr": 1}, {**base, "lr": 1}])
    assert "ranks 1, 2 differ from rank 0 in lr (0.1 on rank 0, 1 on rank 1)" in two
    nested = rdist.mismatch_message([base, {**base, "test_data": {"n": 100}}, {**base, "extra": [1]}])
    assert "test_data.n (200 on rank 0, 100 on rank 1)" in nested and 'extra ("(absent)" on rank 0, [1] on rank 2)' in nested


def test_canonical_json_ignores_key_order_only() -> None:
    assert rdist.canonical_json({"b": 1, "a": [1, 2]}) == rdist.canonical_json({"a": [1, 2], "b": 1})
    assert rdist.canonical_json({"a": 1}) != rdist.canonical_json({"a": 1.5})
    assert rdist.canonical_json({"p": Path("/x")}) == '{"p":"/x"}'


def test_data_summary_fingerprints_contents_cheaply() -> None:
    from robustopt.training.batches import Source

    x, y = torch.rand(50, 3), torch.arange(50) % 3
    a = rdist.data_summary(Source(x, y))
    assert a == rdist.data_summary(Source(x.clone(), y.clone())) and a["n"] == 50
    x2 = x.clone()
    x2[-1, 0] += 1
    assert rdist.data_summary(Source(x2, y)) != a  # the last example is among the sampled ones
    assert rdist.data_summary(None) is None


def test_the_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rdist.TIMEOUT_ENV, raising=False)
    assert rdist.collective_timeout() == datetime.timedelta(minutes=10)
    monkeypatch.setenv(rdist.TIMEOUT_ENV, "2.5")
    assert rdist.collective_timeout() == datetime.timedelta(seconds=2.5)
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(rdist.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=rdist.TIMEOUT_ENV):
            rdist.collective_timeout()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete",
         "no answer from the other ranks within 3 s"),
        ("[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4828: Connection reset by peer. This is typically",
         "lost the connection to another rank"),
    ],
)  # fmt: skip
def test_a_failed_collective_becomes_one_clear_line(raw: str, says: str) -> None:
    with pytest.raises(rdist.DistributedError) as err:
        with rdist.collective_errors():
            raise RuntimeError(raw)
    text = str(err.value)
    assert says in text and "checkpoints are kept" in text and "\n" not in text and "pair.cc" not in text
    assert isinstance(err.value, RobustoptError)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass unchanged
        with rdist.collective_errors():
            raise RuntimeError("shape mismatch")


# ---------------------------------------------------------------------------- check_same_config, 2 spawned ranks


def _check_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(ENV, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rdist.setup(rdist.DistInfo(rank, WORLD, rank), torch.device("cpu"))
    rdist.check_same_config({"subset": 100, "lr": 0.1})  # the same: passes
    ok = rdist.all_sum([1.0], torch.device("cpu"))  # the group still pairs up after a passed check
    try:
        rdist.check_same_config({"subset": 4000 if rank == 0 else 1000, "lr": 0.1})
        result = "no error"
    except ConfigError as e:
        result = str(e)
    # A refused start destroyed the group setup() made: no gloo thread left to abort the process at exit.
    left = rdist.group_threads()
    Path(f"{out}.{rank}").write_text(json.dumps({"sum": ok, "error": result, "left": left, "up": rdist.dist.is_initialized()}))


def test_check_same_config_refuses_a_mismatch_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "check"
    t0 = time.monotonic()
    mp.spawn(_check_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    assert time.monotonic() - t0 < 60
    for rank in range(WORLD):
        got = json.loads(Path(f"{out}.{rank}").read_text())
        assert got["sum"] == [2.0]
        assert got["error"].startswith("the ranks were started with different configurations: rank 1 differs from rank 0 in ")
        assert "subset (4000 on rank 0, 1000 on rank 1)" in got["error"] and "lr" not in got["error"].split(";")[0]
        assert got["up"] is False
        if Path("/proc/self/task").is_dir():
            assert got["left"] == []


# ---------------------------------------------------------------------------- end to end: the CLI


def test_torchrun_ranks_with_different_subsets_both_exit_with_a_clear_error(tmp_path: Path) -> None:
    """The issue's case: ``--subset 4000`` on rank 0, ``--subset 1000`` on rank 1. Both ranks refuse at start-up
    (exit 2, one line naming the ranks and the key) within 60 s; nothing is written."""
    worker = tmp_path / "worker.sh"
    worker.write_text(
        "#!/bin/sh\n"
        "trap '' TERM\n"  # the wrapper outlives torchrun's SIGTERM to record the rank's status (robustopt sets its own handler)
        'if [ "$RANK" = 1 ]; then S=1000; else S=4000; fi\n'
        f'"{sys.executable}" -m robustopt {" ".join(TRAIN)} --subset $S --out "{tmp_path / "run"}" 2> "$0.err$RANK"\n'
        'rc=$?; echo $rc > "$0.rc$RANK"; exit $rc\n'
    )  # each rank's own stderr and exit status (torchrun's report has a traceback of its own)
    worker.chmod(0o755)
    # torchrun stops every rank once one has failed; polling every 5 s (not 0.1) lets the other rank, which fails
    # at the same moment on its own, finish saying so on a loaded machine.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "--monitor-interval=5",
           "--no-python", str(worker)]  # fmt: skip
    proc, elapsed = _run(cmd, timeout=90, env={**os.environ, **ENV})
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert proc.returncode != 0
    errs = [(tmp_path / f"worker.sh.err{r}").read_text() for r in range(WORLD)]
    assert [(tmp_path / f"worker.sh.rc{r}").read_text().strip() for r in range(WORLD)] == ["2", "2"], errs
    said = "robustopt: error: the ranks were started with different configurations: rank 1 differs from rank 0 in subset"
    for err in errs:
        assert err.startswith(said) and err.count("\n") == 1, err  # one line, nothing else
        assert "subset (4000 on rank 0, 1000 on rank 1)" in err
    assert not (tmp_path / "run" / "config.json").exists()


_FACTORY = """
import os, time
from torch import nn

class Net(nn.Module):
    \"\"\"A linear MNIST net whose rank 1 dies (or hangs) once rank 0 has checkpointed epoch 1.\"\"\"

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x):
        if os.environ.get("RANK") == "1" and os.path.exists(os.environ["PEER_FAILS_AFTER"]):
            if os.environ["PEER_FAILS_HOW"] == "exit":
                os._exit(1)
            time.sleep(3600)
        return self.body(x)

def build():
    return Net()
"""


def _two_ranks(tmp_path: Path, how: str, timeout_s: float) -> list[subprocess.Popen]:
    """Two CLI ranks started as torchrun would (its environment), without torchrun's agent, which would
    itself kill the surviving rank when the other exits: here the survivor must end on its own."""
    (tmp_path / "peerfail.py").write_text(_FACTORY)
    run = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, **ENV, "PYTHONPATH": str(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_PORT": str(port),
               rdist.TIMEOUT_ENV: str(timeout_s), "PEER_FAILS_AFTER": str(run / "checkpoint.safetensors"),
               "PEER_FAILS_HOW": how}  # fmt: skip
        cmd = [sys.executable, "-m", "robustopt", *TRAIN, "--model", "peerfail:build", "--subset", "1000", "--epochs", "3",
               "--out", str(run)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True))  # fmt: skip
    return procs


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"rank still running after {timeout} s: {err[-2000:]}")
    return proc.returncode, err


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def _checkpointed_epochs(run: Path) -> int:
    _, meta = load_tensors(run / "checkpoint.safetensors")
    return int(meta["progress"]["epoch"])


@pytest.mark.parametrize(("how", "says"), [("exit", "lost the connection to another rank"),
                                           ("hang", "no answer from the other ranks within 6 s")])  # fmt: skip
def test_a_dead_or_stuck_peer_ends_the_other_rank_with_a_clear_error_and_the_checkpoint_kept(
    tmp_path: Path, how: str, says: str
) -> None:
    procs = _two_ranks(tmp_path, how, timeout_s=6)
    t0 = time.monotonic()
    try:
        rc, err = _finish(procs[0], timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        _kill(procs)
    lines = [line for line in err.splitlines() if line.startswith("robustopt:")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("robustopt: error: rank 0 of 2: ") and says in lines[0], err[-3000:]
    assert "checkpoints are kept" in lines[0] and "Traceback" not in err
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert _checkpointed_epochs(tmp_path / "run") >= 1  # the last checkpoint is whole and loads


def test_sigterm_reaches_a_rank_waiting_on_a_stuck_peer(tmp_path: Path) -> None:
    """SIGTERM to a rank blocked inside a collective ends it within the collective timeout (before: never)."""
    procs = _two_ranks(tmp_path, "hang", timeout_s=8)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # rank 0 is now waiting for rank 1 inside a collective
        assert procs[0].poll() is None
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        rc, err = _finish(procs[0], timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        _kill(procs)
    assert rc in (2, 128 + signal.SIGTERM), err[-3000:]
    assert elapsed < 8 + 10, f"took {elapsed:.1f} s after SIGTERM"
    assert "Traceback" not in err and _checkpointed_epochs(tmp_path / "run") >= 1


_USER_SCRIPT = """
import json, os, sys, torch
from torch import nn
import robustopt
from robustopt.training.distributed import group_threads
n = 64 if os.environ["RANK"] == "0" else 48  # rank 1 was handed other data
x, y = torch.rand(n, 8), torch.randint(0, 3, (n,))
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
try:
    robustopt.fit(net, (x, y), out=sys.argv[1], threat=robustopt.ThreatModel("linf", 0.1), epochs=1, batch_size=16,
                  device="cpu", progress=False, log=lambda s: None)
    said = "no error"
except robustopt.errors.ConfigError as e:
    said = str(e)
open(sys.argv[1] + ".said" + os.environ["RANK"], "w").write(json.dumps({"said": said, "left": group_threads()}))
"""


def test_fit_in_a_user_script_refuses_ranks_with_different_data(tmp_path: Path) -> None:
    """The library path: ``fit`` under torchrun raises the same ConfigError on every rank, naming the data's
    size, and destroys the group it made (no gloo thread left to abort the process at exit)."""
    script = tmp_path / "user_train.py"
    script.write_text(_USER_SCRIPT)
    # torchrun polls every 5 s, as in the CLI test above
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "--monitor-interval=5",
           str(script)]  # fmt: skip
    _, elapsed = _run([*cmd, str(tmp_path / "run")], timeout=90, env={**os.environ, **ENV})
    assert elapsed < 60
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"run.said{rank}").read_text())
        assert got["said"].startswith("the ranks were started with different configurations: rank 1 differs from rank 0 in ")
        assert "train_data.n (64 on rank 0, 48 on rank 1)" in got["said"]
        if Path("/proc/self/task").is_dir():
            assert got["left"] == []
