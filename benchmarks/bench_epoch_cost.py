"""Epoch cost of each robust training method relative to standard training, side by side in one process.

Run by hand (not collected by pytest)::

    python benchmarks/bench_epoch_cost.py                    # paper-mnist, 10k images, 3 rounds
    python benchmarks/bench_epoch_cost.py --threads 1 --rounds 5
    python benchmarks/bench_epoch_cost.py --dataset cifar10 --data-dir ../shared/data --model resnet18 \
        --images 1280 --batch-size 128 --eps 0.0314 --methods robust,free,fast --rounds 2

Every round trains one epoch of each method with :func:`robustopt.training.named.train` (same seed,
same images, same batch size) and divides each epoch's training time (``train_seconds``: the
loop only, without the test evaluation) by the standard epoch's of that round, so that slow
phases of a shared machine hit numerator and denominator alike. The method order rotates
between rounds. Reported: the median ratio over rounds with its range, the seconds per epoch,
and the peak memory of the epoch: resident set size on CPU (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``), ``torch.cuda.max_memory_allocated`` on CUDA.

The loop's own overhead (data, augmentation, metrics, checkpoints, synchronisations: everything but
the optimiser steps) is measured by timing :func:`robustopt.training.objectives.train_step` inside the
loop: ``in steps`` is the median share of the epoch spent inside it, and ``steps ratio`` the ratio of
those seconds alone, which is the ratio the loop would have with no overhead at all.

``free`` does ``--replays`` optimiser steps per minibatch, so its epoch is also given per
optimiser step: ratio / replays. ``fast`` holds 500 images out for its guard; it trains on the
same number of images as the others (the subset is 500 larger).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from robustopt.devices import pick_device
from robustopt.training import loop
from robustopt.training.config import TrainConfig
from robustopt.training.named import train

METHODS = ("standard", "robust", "pgd", "free", "fast")
IN_STEPS = [0.0]  # seconds spent inside train_step during the current epoch
_train_step = loop.train_step


def _timed_train_step(ctx, x, y):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    try:
        return _train_step(ctx, x, y)
    finally:
        IN_STEPS[0] += time.perf_counter() - t


loop.train_step = _timed_train_step


def reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; returns the current usage in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass
    return _proc_status_mib("VmRSS")


def peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mib("VmHWM")


def _proc_status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_epoch(method: str, args: argparse.Namespace, out: Path, device: torch.device) -> tuple[float, float, float, float]:
    """Train one epoch; returns (training seconds, peak MiB, MiB above the usage at the start, seconds in train_step)."""
    subset = args.images + (500 if method == "fast" else 0)
    cfg = TrainConfig(
        dataset=args.dataset, model=args.model, method=method, eps=args.eps, epochs=1, subset=subset,
        test_subset=args.test_images, batch_size=args.batch_size, seed=0, replays=args.replays, amp=args.amp,
    )  # fmt: skip
    start = reset_peak(device)
    IN_STEPS[0] = 0.0
    summary = train(
        cfg, out / method, data_dir=args.data_dir, device=str(device), overwrite=True, progress=False, log=lambda s: None
    )
    top = peak(device)
    return summary.train_seconds, top, top - start, IN_STEPS[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist | cifar10")
    p.add_argument("--model", default="paper-mnist", help="e.g. resnet18 or paper-cifar with --dataset cifar10")
    p.add_argument("--data-dir", type=Path, default=None, help="where to find cifar10 (e.g. ../shared/data)")
    p.add_argument("--test-images", type=int, default=500, help="test images evaluated after each epoch (not timed)")
    p.add_argument("--images", type=int, default=10_000, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--replays", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    methods = [m for m in args.methods.split(",") if m != "standard"]
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  cpus={os.cpu_count()}  ", end="")
    print(f"threads={torch.get_num_threads()}  device={device}  torch={torch.__version__}  amp={args.amp}")
    print(f"# {args.dataset} {args.model}, {args.images} images/epoch, batch {args.batch_size}, eps {args.eps}, ", end="")
    print(f"{args.rounds} rounds")
    seconds: dict[str, list[float]] = {m: [] for m in ["standard", *methods]}
    stepping: dict[str, list[float]] = {m: [] for m in ["standard", *methods]}
    memory: dict[str, float] = {}
    extra: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        one_epoch("standard", args, Path(tmp), device)  # warm-up: imports, allocator, oneDNN kernels
        for r in range(args.rounds):
            order = ["standard", *methods]
            order = order[r % len(order) :] + order[: r % len(order)]
            for m in order:
                s, top, above, inside = one_epoch(m, args, Path(tmp), device)
                seconds[m].append(s)
                stepping[m].append(inside)
                memory[m], extra[m] = max(memory.get(m, 0.0), top), max(extra.get(m, 0.0), above)
            line = "  ".join(f"{m} {seconds[m][-1]:.2f}s" for m in order)
            print(f"round {r + 1}: {line}  (load average {os.getloadavg()[0]:.2f})", flush=True)
    head = f"{'method':<10}{'s/epoch':>9}{'ratio':>8}{'range':>15}{'per step':>10}{'peak MiB':>10}{'+MiB':>8}"
    print(f"\n{head}{'in steps':>10}{'steps ratio':>20}")
    for m in ["standard", *methods]:
        ratios = [a / b for a, b in zip(seconds[m], seconds["standard"], strict=True)]
        inner = [a / b for a, b in zip(stepping[m], stepping["standard"], strict=True)]
        share = statistics.median(a / b for a, b in zip(stepping[m], seconds[m], strict=True))
        med = statistics.median(ratios)
        per_step = f"{med / args.replays:.2f}" if m == "free" else ""
        print(
            f"{m:<10}{statistics.median(seconds[m]):>9.2f}{med:>8.2f}{f'{min(ratios):.2f}-{max(ratios):.2f}':>15}"
            f"{per_step:>10}{memory[m]:>10.0f}{extra[m]:>8.0f}{share:>10.1%}"
            f"{f'{statistics.median(inner):.2f} ({min(inner):.2f}-{max(inner):.2f})':>20}"
        )
    print(f"\n(free: {args.replays} optimiser steps per minibatch; 'per step' = ratio / replays)")


if __name__ == "__main__":
    main()
