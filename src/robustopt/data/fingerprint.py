"""What data a run trained on: a content hash to record in ``config.json`` and to compare on ``--resume``.

:func:`data_fingerprint` hashes the bytes (with dtype and shape) of every tensor of the data, so two data
sets with the same path but other contents, more examples or new labels get different hashes;
:func:`check_same_data` compares a recorded fingerprint with the current one and refuses, in one
line, when they differ. Hashing is sha256 over blocks of examples (no full copy of the data): a
second or less for CIFAR-10.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from robustopt.data.datasets import Dataset
from robustopt.errors import DataError

_BLOCK = 4096  # examples hashed per block: a CPU copy of at most one block


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed dtype, shape and bytes of ``t`` (any dtype and device) into the hash ``h``."""
    h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    flat = t.detach().reshape(len(t), -1) if t.dim() else t.detach().reshape(1, 1)
    for start in range(0, len(flat), _BLOCK):
        block = flat[start : start + _BLOCK].cpu().contiguous().reshape(-1)
        h.update(block.view(torch.uint8).numpy().tobytes() if block.numel() else b"")


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256(b"robustopt-data-v1\0")
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()


def _pair_fingerprint(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    return {
        "n_train": len(y),
        "input_shape": list(x.shape[1:]),
        "num_classes": int(y.max()) + 1 if len(y) else 0,
        "sha256": _digest([x, y]),
    }


def data_fingerprint(data: Any, path: str | Path | None = None) -> dict[str, Any]:
    """A JSON-ready description of ``data`` that changes whenever its contents do.

    Args:
        data: a :class:`~robustopt.data.datasets.Dataset` (its train and test splits are hashed), a pair of
            tensors ``(x, y)``, a ``TensorDataset``, or a ``DataLoader`` over either. Any other torch
            Dataset is described by its type and length only (``"sha256": None``): its items are not read.
        path: where the data came from (``--data PATH``); a ``Dataset`` of user data carries it as its name.

    Returns:
        ``{"source", "n_train", "input_shape", "num_classes", "sha256"}`` (plus ``"n_test"`` for a Dataset):
        ``source`` is the built-in name, the absolute path, or the Python type of the data.
    """
    inner = data.dataset if isinstance(data, DataLoader) else data
    source = str(Path(path).expanduser().resolve()) if path is not None else None
    if isinstance(inner, Dataset):
        out = _pair_fingerprint(inner.x_train, inner.y_train)
        out["n_test"] = len(inner.y_test)
        out["num_classes"] = inner.num_classes
        out["sha256"] = _digest([inner.x_train, inner.y_train, inner.x_test, inner.y_test])
        return {"source": source or inner.name, **out}
    if isinstance(inner, TensorDataset) and len(inner.tensors) >= 2:
        inner = inner.tensors[:2]
    if isinstance(inner, (tuple, list)) and len(inner) == 2 and all(torch.is_tensor(t) for t in inner):
        return {"source": source or "tensors", **_pair_fingerprint(inner[0], inner[1])}
    n = len(inner) if hasattr(inner, "__len__") else None
    kind = f"{type(inner).__module__}.{type(inner).__qualname__}"
    return {"source": source or kind, "n_train": n, "input_shape": None, "num_classes": None, "sha256": None}


def check_same_data(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], where: str = "--resume") -> None:
    """Refuse when ``current`` (a :func:`data_fingerprint`) differs from the one a run recorded.

    The contents decide: the same bytes at another path pass, and ``source`` is compared only when
    either side has no content hash. Fields missing on either side (an older run, data that cannot
    be hashed) are not compared; ``recorded`` None (a run from before fingerprints) passes.
    """
    if recorded is None:
        return
    if not isinstance(recorded, Mapping):
        raise DataError(f"{where}: the run's recorded data fingerprint is not an object ({type(recorded).__name__}); edited?")
    changed = []
    hashed = recorded.get("sha256") is not None and current.get("sha256") is not None
    for key in ("n_train", "n_test", "input_shape", "num_classes", "sha256") if hashed else ("source", "n_train"):
        old, new = recorded.get(key), current.get(key)
        if old is not None and new is not None and old != new:
            show = (lambda v: f"{v[:12]}…") if key == "sha256" and isinstance(old, str) and isinstance(new, str) else str
            changed.append(f"{key} {show(old)} -> {show(new)}")
    if changed:
        raise DataError(
            f"{where}: the data changed since the run started ({'; '.join(changed)}); resume with the original data, "
            "or start a new run (another --out, or --overwrite)"
        )
