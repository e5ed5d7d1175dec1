"""Tensors on disk: safetensors files carrying a content hash that is checked on every load.

Nothing is ever unpickled. A file's header is checked against its size before anything is
allocated, so a truncated file, a FIFO or a lying header is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from robustopt.errors import CheckpointError, one_line
from robustopt.files import atomic_write, open_regular

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on its JSON header


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
    """The plain module under DistributedDataParallel, DataParallel and torch.compile wrappers (any nesting).

    Only those wrappers: a user's net that merely has a submodule named ``module`` is returned whole."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
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
        raise CheckpointError(f"{path} does not match the model architecture: {one_line(str(e))}") from None
