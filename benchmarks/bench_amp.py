"""Epoch cost of mixed precision against full precision, for any recipe, side by side in one process.

Run by hand (not collected by pytest)::

    python benchmarks/bench_amp.py --config recipes/cifar10-fast-preact18.toml --data-dir DATA --images 12500 \
        --rounds 2 --device cuda

Each round trains one epoch of the recipe (same seed, same images) once per precision variant
(``--variants off,bf16``; the order rotates between rounds) with :func:`robustopt.training.named.train`
and reads the epoch's training time (``train_seconds``: the loop only, without the test
evaluation). Printed: seconds per epoch and each variant's time divided by the first variant's,
median over rounds with the range, and the clean test accuracy after the epoch (a sanity check
that the cheaper precision still learns).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from robustopt.devices import pick_device
from robustopt.training.config import CONFIG_KEYS, make_config, read_toml
from robustopt.training.named import train


def one_epoch(base: dict, amp: str, images: int, device: str, data_dir: Path | None, root: Path) -> tuple[float, float]:
    cfg = make_config({**base, "amp": amp, "epochs": 1, "subset": images, "test_subset": 1000, "checkpoint_minutes": 1e6})
    summary = train(cfg, root / amp, data_dir=data_dir, device=device, overwrite=True, progress=False, log=lambda s: None)
    return summary.train_seconds, summary.test_acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="a recipe or any TOML of TrainConfig keys")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--images", type=int, default=10_000, help="training images per epoch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="off,bf16", help="comma-separated amp modes; the first is the reference")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    base = read_toml(args.config, CONFIG_KEYS)
    variants = args.variants.split(",")
    dev = pick_device(args.device)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"config {args.config}: {dataclasses.asdict(make_config(base))['model']}, {args.images} images per epoch")
    times: dict[str, list[float]] = {v: [] for v in variants}
    accs: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        one_epoch(base, variants[0], min(args.images, 1024), args.device, args.data_dir, Path(tmp))  # warm-up (cuDNN, allocator)
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                seconds, acc = one_epoch(base, v, args.images, args.device, args.data_dir, Path(tmp))
                times[v].append(seconds)
                accs[v].append(acc)
                print(f"round {r + 1} amp={v}: {seconds:.2f} s, test acc {acc:.3f}", flush=True)
    ref = variants[0]
    for v in variants:
        ratios = [t / t0 for t, t0 in zip(times[v], times[ref], strict=True)]
        print(
            f"amp={v:5s} {statistics.median(times[v]):7.2f} s/epoch  ÷ {ref}: {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f})  test acc {statistics.median(accs[v]):.3f}"
        )


if __name__ == "__main__":
    main()
