"""Extra training data mixed into every minibatch (Carmon et al. 2019, arXiv 1905.13736; Wang et al. 2023).

``--extra-data FILE`` is an ``.npz`` with ``x`` and ``y`` (or ``x_train`` and ``y_train``): images in any layout
robustopt reads (uint8 0–255 or float in [0, 1]) with labels or pseudo-labels 0..K−1. It must have the training
data's input shape and classes.

With ``--extra-ratio r`` and ``--batch-size B``, each minibatch holds ``n = round(r·B)`` extra examples and
``B − n`` training examples (Carmon et al.: B = 256, r = 0.5); an epoch is still one pass over the training
data, so it has ``⌈N / (B − n)⌉`` minibatches. The extra examples of minibatch i of an epoch are positions
``i·n … i·n + n − 1`` (cyclically) of a permutation of the extra set that is a pure function of
``(seed, epoch)`` (a ``DistributedSampler`` with its own seed, sharded over ranks), so resume skips to
the same examples and the runs are reproducible.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from robustopt.data.datasets import to_float
from robustopt.data.fingerprint import data_fingerprint
from robustopt.data.validation import check_data_bytes, input_tensor, user_layout
from robustopt.errors import DataError
from robustopt.threat.model import ThreatModel
from robustopt.training.batches import Source, check_examples
from robustopt.training.config import TrainConfig
from robustopt.training.distributed import DistInfo

Tensor = torch.Tensor
SEED_OFFSET = 7_654_321  # the extra data's order is independent of the training data's


def extra_count(cfg: TrainConfig) -> int:
    """Extra examples per minibatch: round(r·B), at least 1 and at most B − 1; 0 without extra data."""
    if cfg.extra_data is None:
        return 0
    return min(max(1, round(cfg.extra_ratio * cfg.batch_size)), cfg.batch_size - 1)


def labelled_batch_size(cfg: TrainConfig) -> int:
    """Training examples per minibatch: B − round(r·B)."""
    return cfg.batch_size - extra_count(cfg)


def load_extra(path: str, input_shape: tuple[int, ...], num_classes: int, domain: ThreatModel) -> Source:
    """The extra set as a :class:`Source`, checked against the training data's shape, classes and domain."""
    where = str(Path(path).expanduser())
    try:
        with zipfile.ZipFile(Path(where)) as z:
            check_data_bytes(where, sum(i.file_size for i in z.infolist()), "its arrays (uncompressed)")
        with np.load(where, allow_pickle=False) as f:
            keys = ("x", "y") if "x" in f.files else ("x_train", "y_train")
            if not all(k in f.files for k in keys):
                raise DataError(f"--extra-data {where}: needs arrays x and y (or x_train and y_train), has {', '.join(f.files)}")
            x_raw, y_raw = f[keys[0]], f[keys[1]]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"--extra-data {where}: not a readable .npz ({type(e).__name__}: {e})") from None
    x = input_tensor(user_layout(x_raw, where), where)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"--extra-data {where}: examples have shape {tuple(x.shape[1:])}, the training data {tuple(input_shape)}")
    if y_raw.ndim != 1 or len(y_raw) != len(x) or not np.issubdtype(y_raw.dtype, np.integer):
        raise DataError(f"--extra-data {where}: y must be {len(x)} integer labels, got {y_raw.dtype} {y_raw.shape}")
    y = torch.from_numpy(y_raw.astype(np.int64))
    for start in range(0, len(y), 8192):
        check_examples(to_float(x[start : start + 8192]), y[start : start + 8192], domain, num_classes, f"--extra-data {where}")
    return Source(x, y)


def fingerprint(source: Source) -> str:
    """sha256 of the extra examples and labels, so ``--resume`` refuses changed extra data."""
    return str(data_fingerprint((source.x, source.y))["sha256"])


def extra_batches(
    source: Source, n: int, *, seed: int, epoch: int, info: DistInfo, device: torch.device, start: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's extra examples for minibatches ``start, start + 1, ...`` of ``epoch``: n at a time, forever."""
    sampler = DistributedSampler(range(len(source)), num_replicas=info.world_size, rank=info.rank, seed=seed + SEED_OFFSET)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    i = start
    while True:
        idx = order[(i * n + torch.arange(n)) % len(order)]
        xb, yb = source.take(idx)
        yield to_float(xb).to(device), yb.long().to(device)
        i += 1


def mixed(stream: Iterator[tuple[Tensor, Tensor]], extra: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Each training minibatch followed by its extra examples: (B, ...) and (B,)."""
    for (x, y), (xe, ye) in zip(stream, extra, strict=False):
        yield torch.cat([x, xe]), torch.cat([y, ye])
