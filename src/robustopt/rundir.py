"""Run directories: their files, their lock, and the transaction that writes them (:class:`RunDir`).

A run directory holds:

* ``config.json``: model, data, normalisation, the threat, every training argument, versions;
* ``model.safetensors``: the weights (metadata carries a content hash, checked on load);
* ``best.safetensors``: with ``eval_pgd``, the weights of the best held-out PGD accuracy;
* ``checkpoint.safetensors``: weights + optimiser state + RNG states + data position;
* ``metrics.jsonl``: one JSON line per epoch;
* ``summary.json``: written last; its presence marks a finished run.

Nothing is ever unpickled: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustopt.errors import RunDirError
from robustopt.files import MAX_JSON_BYTES, atomic_write, read_json, read_regular, write_json

BEST = "best.safetensors"  # the weights of the best held-out PGD accuracy (training with --eval-pgd)
CONFIG, MODEL, CHECKPOINT, METRICS, SUMMARY = (
    "config.json",
    "model.safetensors",
    "checkpoint.safetensors",
    "metrics.jsonl",
    "summary.json",
)
RUN_FILES = (CONFIG, MODEL, CHECKPOINT, METRICS, SUMMARY)
LOCK = ".lock"
SET_ASIDE = ".overwritten"  # an --overwrite's previous run, kept until the new run has finished an epoch


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).is_file()


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the full history (atomic, so it always matches the checkpoint)."""
    atomic_write(run_dir / METRICS, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history).encode())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in read_regular(path, MAX_JSON_BYTES).decode().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is corrupt ({e})") from None


def check_out(out: str | Path) -> Path:
    """Validate an ``--out`` value before anything is written; returns it as a Path."""
    text = os.fspath(out) if isinstance(out, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise RunDirError(f"--out must be a directory path, got {out!r}")
    if not text.strip():
        raise RunDirError("--out is empty; name a run directory, e.g. --out runs/A")
    if "\0" in text:
        raise RunDirError(f"--out {text!r} contains a NUL byte; choose another --out")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a run directory; choose another --out")
    return path


class RunLock:
    """An exclusive OS lock (``flock``) on ``<out>/.lock``, held for a ``with`` block or until :meth:`release`.

    A second writer is refused at once with :class:`RunDirError`. The kernel drops the lock when the
    holder dies (even by SIGKILL), so a crash never leaves a run locked. On release the file is
    unlinked while still locked; a contender that opened the old file re-checks after locking that
    the path still names the file it locked, and otherwise retries, so two holders can never coexist.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(
                    f"another robustopt process is writing {self.out} (pid {pid}); wait for it or choose another --out"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its previous holder had already unlinked: try again
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _train_section(cfg: Any) -> dict[str, Any] | None:
    """The ``train`` section of a parsed config.json, or None when robustopt did not write it."""
    return cfg["train"] if isinstance(cfg, dict) and isinstance(cfg.get("train"), dict) else None


def _saved_training_keys(out: Path) -> dict[str, Any]:
    """The ``train`` section of ``out/config.json``; a config.json that robustopt did not write is refused."""
    saved = _train_section(read_json(out / CONFIG))
    if saved is None:
        raise RunDirError(f"{out / CONFIG} is not a robustopt run configuration; choose another --out (nothing was deleted)")
    return saved


def _replaceable(out: Path) -> bool:
    """Whether ``--overwrite`` may empty ``out``: its config.json is a robustopt run's, or is damaged beside run files."""
    try:
        cfg = read_json(out / CONFIG)
    except RunDirError:  # corrupt JSON: a damaged run of ours when other run files sit beside it
        return any((out / name).exists() for name in (MODEL, CHECKPOINT, METRICS, SUMMARY))
    return _train_section(cfg) is not None


def changed_keys(out: Path, training_keys: dict[str, Any], saved: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """The training keys whose value in ``out/config.json`` (or ``saved``, its train section) differs from
    ``training_keys``: ``{key: (saved value or None, requested value)}``."""
    saved = _saved_training_keys(out) if saved is None else saved
    return {k: (saved.get(k), v) for k, v in training_keys.items() if k not in saved or saved[k] != v}


def check_run_dir(out: Path, training_keys: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """Check ``out`` against the request without changing anything; returns True when a checkpoint should be resumed.

    Refuses: a file in place of the directory, a ``config.json`` that is not a robustopt run's (even with
    ``overwrite``), a finished run without ``overwrite``, an unfinished one without ``resume``, and a
    resume whose training keys differ from the saved ones.
    """
    check_out(out)
    if not (out / CONFIG).exists():
        return False
    if overwrite:
        if not _replaceable(out):
            raise RunDirError(f"{out / CONFIG} is not a robustopt run configuration; choose another --out (nothing was deleted)")
        return False
    saved = _saved_training_keys(out)
    if is_finished(out):
        raise RunDirError(f"{out} already holds a finished run; pass --overwrite to replace it or choose another --out")
    if not resume:
        raise RunDirError(f"{out} already holds an unfinished run; pass --resume to continue it or --overwrite to restart")
    diff = sorted(changed_keys(out, training_keys, saved))
    if diff:
        raise RunDirError(
            f"{out} holds a run with a different configuration ({', '.join(diff)}); use another --out or --overwrite"
        )
    return (out / CHECKPOINT).exists()


def stray_tmp_files(out: Path) -> list[Path]:
    """Temporary files of :func:`atomic_write` left behind by a process killed mid-write."""
    return sorted(p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp"))


def clean_stray_tmp(out: Path) -> None:
    """Delete stray temporary files; call only while holding :class:`RunLock` (then no write is in flight)."""
    for p in stray_tmp_files(out):
        p.unlink(missing_ok=True)


def replace_run(out: Path) -> None:
    """Move the run files in ``out`` aside into ``out/.overwritten`` (other files are left alone).

    The previous run stays there until the new run has finished its first epoch (:func:`drop_set_aside`);
    a new run that ends before that, by an error, Ctrl-C or a kill, gets it back (:func:`restore_set_aside`),
    so a bad ``--overwrite`` never loses a finished run. Call only after every check has passed and
    while holding :class:`RunLock`, after :func:`restore_set_aside` (step 3 above).
    """
    clean_stray_tmp(out)
    if not (out / CONFIG).exists():  # no run here to keep, stray files at most
        _delete_run_files(out)
        return
    aside = out / SET_ASIDE
    aside.mkdir()
    # config.json last: its presence in the set-aside folder marks the move as complete (see restore_set_aside)
    for name in (SUMMARY, MODEL, BEST, CHECKPOINT, METRICS, CONFIG):
        if (out / name).exists():
            os.replace(out / name, aside / name)


def _delete_run_files(out: Path) -> None:
    for name in (SUMMARY, MODEL, BEST, CHECKPOINT, METRICS, CONFIG):  # summary first, as above
        (out / name).unlink(missing_ok=True)


def restore_set_aside(out: Path) -> bool:
    """Put back the run an ``--overwrite`` set aside, replacing what the new run wrote; True when there was one.

    Called when the new run ends before finishing an epoch, and when a command finds a set-aside run
    left by a killed one (holding :class:`RunLock`).
    """
    aside = out / SET_ASIDE
    if not aside.is_dir():
        return False
    clean_stray_tmp(out)
    if (aside / CONFIG).exists():  # the move was complete, so every run file in out is the new run's
        _delete_run_files(out)
    # else: killed mid-move; what was not moved yet is still the old run's, and the new run wrote nothing
    for name in (CONFIG, METRICS, CHECKPOINT, BEST, MODEL, SUMMARY):  # summary last: the run reads as finished only when whole
        if (aside / name).exists():
            os.replace(aside / name, out / name)
    shutil.rmtree(aside)
    return True


def drop_set_aside(out: Path) -> None:
    """Delete the run an ``--overwrite`` set aside: the new run has finished an epoch and can stand in its place."""
    shutil.rmtree(out / SET_ASIDE, ignore_errors=True)


class RunDir:
    """One writer's transaction on a run directory; the order of the protocol lives here, not in callers.

    ``open`` (holding the lock for the life of the object): give back a run that a killed ``--overwrite`` set
    aside, check the request against what is there (a finished run is never touched without ``overwrite``,
    an unfinished one is continued only with ``resume`` and the same training keys), then set the old run
    aside (``overwrite``) or clean stray temp files. ``epoch_done`` drops the set-aside run once the new run
    has a finished epoch to stand in its place; ``abort`` gives it back if the new run ends before that.
    Only the main rank (``is_main``) touches the files; other ranks just learn whether to resume.

        >>> with RunDir(out) as rd:
        ...     resume = rd.open(keys, resume=False, overwrite=True)
        ...     ...  # train; rd.epoch_done() after each epoch; rd.abort() on failure
    """

    def __init__(self, out: str | Path, *, is_main: bool = True, log: Callable[[str], None] = print) -> None:
        self.out = check_out(out)
        self.is_main = is_main
        self.log = log
        self._lock = RunLock(self.out) if is_main else None

    def __enter__(self) -> RunDir:
        if self._lock is not None:
            self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()

    def open(self, training_keys: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
        """Check, then replace or continue; returns True when the run's checkpoint should be resumed."""
        if not self.is_main:
            return resume and (self.out / CHECKPOINT).exists()
        if restore_set_aside(self.out):  # a killed --overwrite: its new run never finished an epoch
            self.log(f"restored the previous run that an interrupted --overwrite had set aside in {self.out}")
        do_resume = check_run_dir(self.out, training_keys, resume=resume, overwrite=overwrite)
        replace_run(self.out) if overwrite else clean_stray_tmp(self.out)
        return do_resume

    def epoch_done(self) -> None:
        if self.is_main:
            drop_set_aside(self.out)

    def abort(self) -> None:
        """The new run ended before finishing an epoch: give back the run an ``--overwrite`` set aside."""
        if self.is_main and restore_set_aside(self.out):
            self.log(f"the new run ended before finishing an epoch; the previous run in {self.out} is restored")

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            write_json(self.out / name, obj)
