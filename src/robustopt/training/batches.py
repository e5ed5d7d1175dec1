"""Training and test data as the loop sees them: any dataset, batched in a resumable order.

:func:`as_source` accepts a robustopt :class:`~robustopt.data.datasets.Dataset` split, a pair of
tensors ``(x, y)``, a ``torch.utils.data.Dataset`` of ``(x, y)`` items, or a ``DataLoader``
(its dataset, collate function and batch size are used; its sampler is replaced, see below).

The order of an epoch is a pure function of ``(seed, epoch)`` through a
``DistributedSampler``, whatever the source: that is what makes resume exact and shards the
data under torchrun. Inputs are float in ``[0, 1]`` (uint8 images are divided by 255), labels
int64 class indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data.dataloader import default_collate

from robustopt.data.datasets import to_float
from robustopt.data.validation import example_pair
from robustopt.errors import DataError
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import preserve_state
from robustopt.training.distributed import DistInfo

Tensor = torch.Tensor
TrainData = Any  # tuple[Tensor, Tensor] | torch.utils.data.Dataset | DataLoader


@dataclass
class Source:
    """N examples, indexable by a batch of indices. In-memory tensors take the fast path."""

    x: Tensor | None = None  # (N, ...) uint8 or float, when the data are tensors
    y: Tensor | None = None  # (N,)
    dataset: TorchDataset | None = None  # otherwise: any map-style dataset of (x, y)
    collate: Callable[[list[Any]], Any] = default_collate
    batch_size: int | None = None  # a DataLoader's own batch size

    def __len__(self) -> int:
        return len(self.y) if self.y is not None else len(self.dataset)  # type: ignore[arg-type]

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Examples ``idx`` as (x, y) on the source's device, x not yet converted."""
        if self.x is not None and self.y is not None:
            i = idx.to(self.x.device)
            return self.x[i], self.y[i]
        items = [self.dataset[int(i)] for i in idx]  # type: ignore[index]
        return example_pair(self.collate(items), "train_data")

    def split(self, n: int) -> tuple[Source, Source]:
        """(all but the last n, the last n): a held-out part of the training data."""
        if n >= len(self):
            raise DataError(f"cannot hold out {n} of {len(self)} training examples; lower --eval-pgd or use more data")
        keep, held = torch.arange(len(self) - n), torch.arange(len(self) - n, len(self))
        return self.subset(keep), self.subset(held)

    def subset(self, idx: Tensor) -> Source:
        if self.x is not None and self.y is not None:
            return Source(self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)])
        return Source(dataset=torch.utils.data.Subset(self.dataset, idx.tolist()), collate=self.collate)  # type: ignore[arg-type]

    def head(self, n: int | None) -> Source:
        return self if n is None or n >= len(self) else self.subset(torch.arange(n))

    def to(self, device: torch.device) -> Source:
        """Move in-memory tensors to ``device`` (on CUDA batches then never wait on the host)."""
        if self.x is None or self.y is None:
            return self
        return Source(self.x.to(device), self.y.to(device))


def as_source(data: TrainData, what: str = "train_data") -> Source:
    """Wrap any supported data object; a clear error for anything else."""
    if isinstance(data, Source):
        return data
    if isinstance(data, DataLoader):
        inner = as_source(data.dataset, what)
        inner.batch_size = data.batch_size
        if inner.x is None:
            inner.collate = data.collate_fn or default_collate
        return inner
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        return _tensor_source(data.tensors[0], data.tensors[1], what)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return _tensor_source(data[0], data[1], what)
    if isinstance(data, TorchDataset) and hasattr(data, "__len__"):
        if len(data) == 0:  # type: ignore[arg-type]
            raise DataError(f"{what} is empty")
        return Source(dataset=data)
    raise DataError(
        f"{what} must be a pair of tensors (x, y), a torch Dataset of (x, y) items or a DataLoader, got {type(data).__name__}"
    )


def _tensor_source(x: Tensor, y: Tensor, what: str) -> Source:
    if len(x) != len(y):
        raise DataError(f"{what}: x has {len(x)} examples but y has {len(y)}")
    if len(y) == 0:
        raise DataError(f"{what} is empty")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{what}: labels must be a 1-D integer tensor of class indices, got {tuple(y.shape)} {y.dtype}")
    return Source(x, y.long())


def batches(
    source: Source,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    info: DistInfo,
    device: torch.device,
    start: int = 0,
    shuffle: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's minibatches of an epoch as float (B, ...) in [0, 1] and int64 (B,), skipping ``start``."""
    sampler = DistributedSampler(range(len(source)), num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.long)
    for i in range(start * batch_size, len(idx), batch_size):
        xb, yb = source.take(idx[i : i + batch_size])
        yield to_float(xb).to(device, non_blocking=True), yb.long().to(device, non_blocking=True)


def num_batches(n: int, batch_size: int, info: DistInfo) -> int:
    return math.ceil(math.ceil(n / info.world_size) / batch_size)


def eval_batches(source: Source, device: torch.device, info: DistInfo, batch_size: int = 500) -> Iterator[tuple[Tensor, Tensor]]:
    """Every example once, in order, sharded over ranks."""
    for start in range(info.rank * batch_size, len(source), batch_size * info.world_size):
        xb, yb = source.take(torch.arange(start, min(start + batch_size, len(source))))
        yield to_float(xb).to(device), yb.long().to(device)


def check_examples(x: Tensor, y: Tensor, threat: ThreatModel, num_classes: int, what: str) -> None:
    """Refuse inputs outside the threat's domain, non-finite inputs and labels out of range."""
    lo, hi = threat.bounds
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} contains NaN or infinite inputs; clean the data first")
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < lo - 1e-6 or x_max > hi + 1e-6:
        raise DataError(
            f"{what} has inputs in [{x_min:g}, {x_max:g}] but the threat model's domain is [{lo:g}, {hi:g}]; "
            "scale images to [0, 1] (uint8 / 255) and normalise inside the model (robustopt.Normalized)"
        )
    y_min, y_max = int(y.min()), int(y.max())
    if y_min < 0 or y_max >= num_classes:
        raise DataError(f"{what} has labels in [{y_min}, {y_max}] but the model has {num_classes} classes (0..{num_classes - 1})")


def check_source(source: Source, threat: ThreatModel, num_classes: int, what: str) -> None:
    """Validate all of an in-memory source, or the first 256 examples of any other dataset."""
    if source.x is not None and source.y is not None:
        for start in range(0, len(source), 8192):  # chunks: uint8 images stay uint8 until checked
            sl = slice(start, start + 8192)
            check_examples(to_float(source.x[sl]), source.y[sl], threat, num_classes, what)
        return
    xb, yb = source.take(torch.arange(min(256, len(source))))
    check_examples(to_float(xb), yb.long(), threat, num_classes, what)


def probe_num_classes(model: nn.Module, source: Source, device: torch.device, expected: int | None) -> int:
    """Run the model on two examples: its logit count, checked against the data's class count."""
    xb, _ = source.take(torch.arange(min(2, len(source))))
    try:
        with torch.no_grad(), preserve_state(model):
            model.eval()
            out = model(to_float(xb).to(device))
    except Exception as e:  # noqa: BLE001 - any failure here is the model rejecting the data's shape
        raise DataError(f"the model cannot take inputs of shape {tuple(xb.shape[1:])}: {type(e).__name__}: {e}") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != len(xb):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise DataError(f"the model must return logits of shape (batch, classes); it returned {shape}")
    k = int(out.shape[1])
    if expected is not None and k != expected:
        raise DataError(
            f"the model returns {k} logits but the data has {expected} classes; set the model's output size to {expected}"
        )
    return k
