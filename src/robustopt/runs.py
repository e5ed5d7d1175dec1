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

import hashlib
import json
import os
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

CONFIG, MODEL, CHECKPOINT, METRICS, SUMMARY = (
    "config.json",
    "model.safetensors",
    "checkpoint.safetensors",
    "metrics.jsonl",
    "summary.json",
)


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
        return json.loads(path.read_text())
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


def _header_metadata(raw: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]).get("__metadata__", {}) or {}


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load safetensors and verify the content hash; clear errors for bad files."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
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
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt metadata") from None
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


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match the model architecture: {first}") from None


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
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is corrupt ({e})") from None


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
    path = d / (MODEL if weights == "model" else "best.safetensors")
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
