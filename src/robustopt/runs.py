"""Run directories and safe, atomic, hash-checked files.

A run directory holds:

* ``config.json``: model, dataset, normalisation, every training argument, versions;
* ``model.safetensors``: the weights (metadata carries a content hash, checked on load);
* ``checkpoint.safetensors``: weights + optimiser state + RNG states + data position;
* ``metrics.jsonl``: one JSON line per epoch;
* ``summary.json``: written last; its presence marks a finished run.

Nothing is ever unpickled: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from robustopt.errors import CheckpointError, RunDirError
from robustopt.files import open_regular, read_regular

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
MAX_JSON_BYTES = 64 << 20  # config.json, summary.json, metrics.jsonl: kilobytes in practice
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on its JSON header


# ---------------------------------------------------------------- atomic files


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_regular(path, MAX_JSON_BYTES).decode())
    except FileNotFoundError:
        raise RunDirError(f"{path} not found; is this a robustopt run directory?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is corrupt ({e}); re-run training with --overwrite") from None


# ---------------------------------------------------------------- tensors


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: reshape first
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Atomically save tensors as safetensors, with JSON metadata and a content hash."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {"robustopt": json.dumps(meta or {}), "content_sha256": content_hash(tensors)}
    atomic_write(path, st_save(tensors, metadata=metadata))


def _read_safetensors(path: Path) -> bytes:
    """The bytes of a safetensors file, read only after its header has been checked against its size.

    Layout: an 8-byte little-endian header length n, n bytes of JSON mapping each tensor to its
    ``data_offsets`` [begin, end) in the data section, then the data. The file must be exactly
    8 + n + max(end) bytes, so a FIFO, a device or a lying header is refused before any allocation.
    """
    f, size = open_regular(path)
    with f:
        if size < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes) or not a safetensors file; retrain or restore it")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} declares a {n}-byte header but holds {size} bytes; truncated, or not safetensors")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a malformed header ({type(e).__name__}); retrain or restore it") from None
        described = 8 + n + max(ends, default=0)
        if size != described:
            raise CheckpointError(f"{path} holds {size} bytes but its header describes {described}; truncated or corrupt")
        f.seek(0)
        return f.read(size)


def _header_metadata(raw: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {}) or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load safetensors and verify the content hash; clear errors for bad files."""
    try:
        raw = _read_safetensors(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        tensors = st_load(raw)
        meta = _header_metadata(raw)
    except (SafetensorError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); retrain or restore it") from None
    expected = meta.get("content_sha256")
    if expected is None:
        raise CheckpointError(f"{path} carries no content hash; it was not written by robustopt")
    if content_hash(tensors) != expected:
        raise CheckpointError(f"{path} fails its content-hash check: the file was modified or corrupted")
    try:
        info = json.loads(meta.get("robustopt", "{}"))
    except (TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has corrupt metadata") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} has corrupt metadata (not a JSON object)")
    return tensors, info


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(path: Path, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    save_tensors(path, dict(unwrap(model).state_dict()), meta)


def state_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """What differs between ``model``'s state dict and ``tensors`` (missing, unexpected, other shapes), or None."""
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(want[k].shape)}" for k in sorted(set(want) & set(tensors))
              if tensors[k].shape != want[k].shape]  # fmt: skip
    parts = [(f"missing {len(missing)}", missing), (f"unexpected {len(unexpected)}", unexpected)]
    parts.append((f"{len(shapes)} of other shape", shapes))
    found = [f"{label}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" for label, names in parts if names]
    return "; ".join(found) or None


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``tensors`` into ``model`` exactly (same names, same shapes); the error names the keys that differ."""
    problem = state_mismatch(model, tensors)
    if problem:
        raise CheckpointError(f"{path} does not match the model architecture ({problem})")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model architecture: {_one_line(str(e))}") from None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


# ---------------------------------------------------------------- run directory


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


# ---------------------------------------------------------------- run directory as a transaction
#
# A writer (train) proceeds in this order, so that a bad invocation never destroys a finished run
# and two writers never mix one directory:
#   1. check_out(out), then validate model, data and config (nothing on disk is touched);
#   2. take RunLock(out) for the life of the writing;
#   3. restore_set_aside(out): give back a run that a killed --overwrite had set aside;
#   4. resume = check_run_dir(out, keys, resume=..., overwrite=...)   (pure: deletes nothing);
#   5. replace_run(out) when overwriting (sets the old run aside), else clean_stray_tmp(out); then train;
#   6. drop_set_aside(out) after the first finished epoch, or restore_set_aside(out) if the run ends before.


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
    diff = sorted(k for k in training_keys if k not in saved or saved[k] != training_keys[k])
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


def load_model(
    run_dir: str | Path, device: str | torch.device = "cpu", *, model: nn.Module | None = None, weights: str = "model"
) -> nn.Module:
    """Rebuild a trained model from its run directory, in eval mode, taking [0, 1] inputs.

    The architecture is rebuilt from ``config.json``: a built-in net, or the run's
    ``package.module:factory`` (called with its recorded keyword arguments). Pass ``model`` to load
    the weights into a module you built yourself (needed for a module handed to ``fit`` as an
    object). ``weights="best"`` loads ``best.safetensors``, the epoch of best held-out PGD accuracy.
    The returned module plugs straight into torchattacks, AutoAttack or foolbox. ``"pretrained:NAME"`` loads a
    model shipped with robustopt (:mod:`robustopt.pretrained`).
    """
    from robustopt.pretrained import resolve_run  # local: a shipped model is a run directory in the package

    d = resolve_run(run_dir)
    if not d.is_dir():
        raise RunDirError(f"run directory {d} does not exist")
    if weights not in ("model", "best"):
        raise RunDirError(f"weights must be 'model' or 'best', got {weights!r}")
    path = d / (MODEL if weights == "model" else BEST)
    if weights == "best" and not path.is_file():
        raise RunDirError(f"{d} has no best.safetensors; it is written when training with --eval-pgd N")
    cfg = read_json(d / CONFIG)
    if model is None:
        model = _rebuild(cfg, d)
    elif not isinstance(model, nn.Module):
        raise RunDirError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, _ = load_tensors(path)
    load_state_into(model, tensors, path)
    return model.to(device).eval()


def _rebuild(cfg: dict[str, Any], d: Path) -> nn.Module:
    """The architecture ``config.json`` names, before its weights are loaded."""
    from robustopt.models.factory import build_from_spec, is_factory_spec  # local: runs.py stays importable without models
    from robustopt.models.zoo import build_model

    name = cfg.get("model") if isinstance(cfg, dict) else None
    if name == "custom":
        raise RunDirError(
            f"{d} was trained from a module handed to robustopt.fit; build the same architecture and call "
            "load_model(run_dir, model=MyNet())"
        )
    if not (isinstance(name, str) and is_factory_spec(name)):
        check_model_fields(cfg, d / CONFIG)  # the fields that size a built-in net, before it is built
    try:
        if isinstance(name, str) and is_factory_spec(name):
            return build_from_spec(name, cfg.get("model_kwargs") or {})
        return build_model(
            name,  # type: ignore[arg-type]
            mean=cfg["normalization"]["mean"],
            std=cfg["normalization"]["std"],
            num_classes=cfg["num_classes"],
            input_shape=tuple(cfg["input_shape"]),
        )
    except (KeyError, TypeError) as e:
        raise RunDirError(f"{d / CONFIG} is missing or has a malformed field {e}; retrain the run") from None


MAX_CLASSES, MAX_CHANNELS, MAX_SIDE, MAX_FEATURES = 100_000, 64, 4096, 10_000_000


def check_model_fields(cfg: Any, path: Path) -> None:
    """Bounds on the fields of a (possibly hand-edited) config.json that size the model, before it is built.

    A huge ``num_classes`` or ``input_shape`` would otherwise try to allocate the weights of a model
    that cannot match any file; a NaN or zero ``std`` would silently produce NaN logits.
    """
    if not isinstance(cfg, dict):
        raise RunDirError(f"{path} is not a JSON object; retrain the run")
    k, shape, norm = cfg.get("num_classes"), cfg.get("input_shape"), cfg.get("normalization")
    if not _is_int(k) or not 1 <= k <= MAX_CLASSES:
        raise RunDirError(f"{path}: num_classes must be a whole number in 1..{MAX_CLASSES}, got {k!r}; retrain the run")
    limits = (MAX_CHANNELS, MAX_SIDE, MAX_SIDE) if isinstance(shape, list) and len(shape) == 3 else (MAX_FEATURES,)
    ok = isinstance(shape, list) and len(shape) == len(limits)
    if not ok or not all(_is_int(v) and 1 <= v <= m for v, m in zip(shape, limits, strict=True)):
        raise RunDirError(
            f"{path}: input_shape must be [C, H, W] with C <= {MAX_CHANNELS} and H, W <= {MAX_SIDE}, or [D] with "
            f"D <= {MAX_FEATURES}, got {shape!r}; retrain the run"
        )
    stats = [norm.get(key) for key in ("mean", "std")] if isinstance(norm, dict) else [None, None]
    if not all(isinstance(v, list) and len(v) in (1, shape[0]) and all(_is_finite(x) for x in v) for v in stats):
        raise RunDirError(f"{path}: normalization needs finite mean and std lists of 1 or {shape[0]} values; retrain the run")
    if min(stats[1]) <= 0:
        raise RunDirError(f"{path}: normalization std must be positive, got {stats[1]}; retrain the run")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
