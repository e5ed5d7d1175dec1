"""torchrun / DistributedDataParallel plumbing.

``torchrun --nproc_per_node=N -m robustopt train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU, nccl on CUDA). Each
rank reads its own shard through a :class:`~torch.utils.data.DistributedSampler`, builds its
perturbations on that shard, and DDP averages the weight gradients. Rank 0 alone writes files.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Read torchrun's environment; a single process when it is absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: torch.device) -> bool:
    """Join the process group when running under torchrun; returns True when this call created it.

    Whoever creates the group destroys it (:func:`teardown`) before returning.
    """
    if info.enabled and not dist.is_initialized():
        init_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size)
        return True
    return False


def init_group(backend: str, **kwargs: object) -> None:
    """``dist.init_process_group(backend, **kwargs)``, with ``torch._dynamo`` imported first.

    Why (the cause of issue 13's SIGABRT): importing ``torch.distributed._shard`` while a group is
    up, which ``torch._dynamo`` does and the first ``optimizer.step()`` imports, leaves references to
    the default group inside torch (torch 2.13). ``destroy_process_group`` then no longer frees it: its
    gloo threads (TCP loop, two workers, and on rank 0 the TCPStore server) run on until interpreter
    shutdown, where the group's C++ destructor runs in no set order and aborts the process about one
    time in ten ("terminate called without an active exception"). Imported before the group exists,
    nothing keeps it, and ``destroy_process_group`` joins those threads. :func:`group_threads` checks it.
    """
    import torch._dynamo  # noqa: F401  (see above: must precede init_process_group)

    dist.init_process_group(backend=backend, **kwargs)  # type: ignore[arg-type]


def group_threads() -> list[str]:
    """Names of this process's threads that belong to a c10d group or store (Linux ``/proc``; [] elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we listed
            continue
    return sorted(n for n in names if n.startswith(("gloo", "pt_gloo", "pt_tcpstore", "pt_nccl")))


_SENT: collections.deque[torch.Tensor] = collections.deque(maxlen=64)


HARD_EXIT = False  # set by the CLI under torchrun: the process leaves with os._exit right after training


def teardown() -> None:
    """End the process group: every rank first waits at a barrier, so none leaves while others still talk.

    Then the group is destroyed, except in a CLI worker that leaves with ``os._exit`` right away
    (:data:`HARD_EXIT`): one such rank was once seen waiting inside ``destroy_process_group``, most
    likely the GIL deadlock that :func:`all_sum` now avoids; a process that exits next has no need to
    destroy anything. The tensors :func:`all_sum` kept are released after the group."""
    if dist.is_initialized():
        dist.barrier()
        if not HARD_EXIT:
            dist.destroy_process_group()
    _SENT.clear()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (identity in a single process).

    The reduced tensor is kept alive until :func:`teardown` (a bounded queue). Why: gloo's worker
    thread drops its reference to a finished collective a little after the caller has its result;
    if that is the tensor's last reference, freeing its Python object needs the GIL. A main thread
    that meanwhile destroys the process group holds the GIL while it joins that worker thread:
    a deadlock, seen in about 1 of 15 torchrun runs of a user script calling ``fit``.
    """
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    _SENT.append(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
