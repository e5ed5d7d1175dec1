"""torchrun / DistributedDataParallel plumbing.

``torchrun --nproc_per_node=N -m robustopt train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU, nccl on CUDA). Each
rank reads its own shard through a :class:`~torch.utils.data.DistributedSampler`, builds its
perturbations on that shard, and DDP averages the weight gradients. Rank 0 alone writes files.

Runs that cannot hang (issue 16): right after the group is up, :func:`check_same_config` compares a
hash of every rank's configuration and refuses a mismatch in one line; every collective waits at most
:func:`collective_timeout` (``ROBUSTOPT_DIST_TIMEOUT``), and :func:`collective_errors` turns a timeout
or a lost peer into a one-line :class:`DistributedError`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from robustopt.errors import ConfigError, RobustoptError


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
    global _OWN_GROUP
    if info.enabled and not dist.is_initialized():
        init_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size)
        _OWN_GROUP = True
        return True
    return False


_OWN_GROUP = False  # setup() made the current group (so a refused start may destroy it)


def init_group(backend: str, **kwargs: object) -> None:
    """``dist.init_process_group(backend, **kwargs)``, with ``torch._dynamo`` imported first.

    Why (the cause of issue 13's SIGABRT): importing ``torch.distributed._shard`` while a group is
    up, which ``torch._dynamo`` does and the first ``optimizer.step()`` imports, leaves references to
    the default group inside torch (torch 2.13). ``destroy_process_group`` then no longer frees it: its
    gloo threads (TCP loop, two workers, and on rank 0 the TCPStore server) run on until interpreter
    shutdown, where the group's C++ destructor runs in no set order and aborts the process about one
    time in ten ("terminate called without an active exception"). Imported before the group exists,
    nothing keeps it, and ``destroy_process_group`` joins those threads. :func:`group_threads` checks it.

    Unless ``timeout`` is given, every collective (and the rendezvous) waits at most :func:`collective_timeout`.
    """
    import torch._dynamo  # noqa: F401  (see above: must precede init_process_group)

    kwargs.setdefault("timeout", collective_timeout())
    with collective_errors():
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
    global _OWN_GROUP
    if dist.is_initialized():
        with collective_errors():
            dist.barrier()
        if not HARD_EXIT:
            dist.destroy_process_group()
    _OWN_GROUP = False
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
    _SENT.append(t)
    with collective_errors():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        with collective_errors():
            dist.barrier()


# ---------------------------------------------------------------------------- runs that cannot hang

TIMEOUT_ENV = "ROBUSTOPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # the longest a rank waits in one collective (or for its peers to join) before giving up


class DistributedError(RobustoptError):
    """Another rank died, hung or could not be reached: this rank cannot go on."""


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits for its peers: ``ROBUSTOPT_DIST_TIMEOUT`` seconds, 600 s (10 min) by default.

    It bounds every collective (gloo: each operation; nccl: the watchdog) and the start-up rendezvous,
    so a dead or stuck peer ends the run instead of hanging it, and a SIGTERM or Ctrl-C that arrives while
    a rank waits inside a collective (Python runs signal handlers only between bytecodes) takes effect
    at the latest when the wait times out.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 7 * 24 * 3600):
        raise ConfigError(
            f"{TIMEOUT_ENV}={raw!r} must be a number of seconds between 0 and 604800 (default {DEFAULT_TIMEOUT_S:g})"
        )
    return datetime.timedelta(seconds=seconds)


_FAILURE_MARKS = ("gloo", "nccl", "timed out", "connection reset", "connection closed", "connection refused", "broken pipe")


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _FAILURE_MARKS)


def _explain(e: BaseException) -> str:
    """One line for a failed collective: what happened to the peers, what is kept, what to do."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../pair.cc:537] " source location
    low = text.lower()
    me = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    kept = "finished epochs and checkpoints are kept; resume once every rank can run"
    if "timed out" in low or "timeout" in low:
        ms = re.search(r"(\d+)\s*ms", text)
        waited = f"{int(ms.group(1)) / 1000:g} s" if ms else f"{collective_timeout().total_seconds():g} s"
        return (
            f"{me}: no answer from the other ranks within {waited}: a rank is stuck, was stopped or died "
            f"(see its own log); {kept} (the wait is {TIMEOUT_ENV} seconds, default {DEFAULT_TIMEOUT_S:g})"
        )
    if any(m in low for m in ("connection reset", "connection closed", "broken pipe", "connection refused")):
        return f"{me}: lost the connection to another rank, which exited or was killed (see its own log); {kept}"
    first = text.split(". ")[0][:300]
    return f"{me}: a collective operation with the other ranks failed ({first}); {kept}"


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Turn a failed or timed-out collective (gloo, nccl, the store) into a one-line :class:`DistributedError`.

    Also a decorator: ``@collective_errors()``. Other exceptions pass through unchanged."""
    try:
        yield
    except RuntimeError as e:
        if not _is_collective_failure(e):
            raise
        raise DistributedError(_explain(e)) from e


def canonical_json(config: Any) -> str:
    """The one text of a configuration: sorted keys, no spaces, non-JSON values as ``str``."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)


def data_summary(source: Any) -> dict[str, Any] | None:
    """Size and a cheap fingerprint of a data source (anything with ``len`` and ``take(idx) -> (x, y)``).

    Hashes the first, middle and last example: the inputs only when they are in-memory tensors (a
    ``Dataset`` may augment at random on every access), the labels always. ``None`` for no data."""
    if source is None:
        return None
    n = len(source)
    if n == 0:
        return {"n": 0}
    idx = torch.tensor(sorted({0, n // 2, n - 1}))
    x, y = source.take(idx)
    h = hashlib.sha256()
    for t in (x, y) if getattr(source, "x", None) is not None else (y,):
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"n": n, "sample_sha256": h.hexdigest()[:16]}


def check_same_config(config: dict[str, Any]) -> None:
    """Refuse to train when the ranks were started with different configurations (a no-op alone).

    Every rank hashes :func:`canonical_json` of ``config`` (the training options, data sizes and
    fingerprints) and the ranks all-gather the 32-byte digests. On a mismatch they exchange the texts
    and every rank raises the same one-line :class:`ConfigError` naming the ranks and keys that differ.
    Why: ranks with, say, different ``--subset`` run different numbers of batches, so their collectives
    stop pairing up and they deadlock. Call it right after the group is up, before any other collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    text = canonical_json(config)
    world, device = dist.get_world_size(), _comm_device()
    mine = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int64, device=device)
    digests = [torch.empty_like(mine) for _ in range(world)]
    with collective_errors():
        dist.all_gather(digests, mine)
    keys = [tuple(d.tolist()) for d in digests]
    _SENT.extend([mine, *digests])  # see all_sum: freed after the group
    if len(set(keys)) == 1:
        return
    texts: list[Any] = [None] * world
    with collective_errors():
        dist.all_gather_object(texts, text)
    message = mismatch_message([json.loads(t) for t in texts])
    _release_own_group()
    raise ConfigError(message)


def _comm_device() -> torch.device:
    """Where a collective's tensors live: the current CUDA device under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: ``{"train": {"subset": 1}}`` -> ``{"train.subset": 1}``."""
    if not isinstance(config, dict):
        return {prefix or "(config)": config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _short(value: Any) -> str:
    text = canonical_json(value)
    return text if len(text) <= 40 else text[:37] + "..."


def mismatch_message(configs: list[Any]) -> str:
    """One line naming, for every configuration that differs from rank 0's, its ranks and up to 4 differing keys."""
    flat = [_flat(c) for c in configs]
    groups: dict[str, list[int]] = {}
    for rank, config in enumerate(configs):
        groups.setdefault(canonical_json(config), []).append(rank)
    missing = object()
    parts = []
    for ranks in groups.values():
        if 0 in ranks:
            continue
        r = ranks[0]
        keys = [k for k in flat[0].keys() | flat[r].keys() if flat[0].get(k, missing) != flat[r].get(k, missing)]
        keys.sort(key=lambda k: ("fingerprint" in k or "sha" in k, k))  # the options first, then the hashes they imply
        shown = ", ".join(
            f"{k} ({_short(flat[0].get(k, '(absent)'))} on rank 0, {_short(flat[r].get(k, '(absent)'))} on rank {r})"
            for k in keys[:4]
        )
        more = f" and {len(keys) - 4} more keys" if len(keys) > 4 else ""
        who = f"rank {r} differs" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} differ"
        parts.append(f"{who} from rank 0 in {shown}{more}")
    return (
        "the ranks were started with different configurations: "
        + "; ".join(parts)
        + "; start every rank with the same arguments and data"
    )


def _release_own_group() -> None:
    """Before a refused start raises: destroy the group :func:`setup` made, once every rank is past the
    exchange (a group alive at interpreter exit can abort the process, see :func:`init_group`). A CLI
    worker (:data:`HARD_EXIT`) leaves with ``os._exit`` and skips it, as in :func:`teardown`."""
    if _OWN_GROUP and not HARD_EXIT and dist.is_initialized():
        teardown()
