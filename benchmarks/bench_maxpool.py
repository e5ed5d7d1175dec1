"""Forward passes with robustopt's max-pool (``models.pool.MaxPool2d``) against ``nn.MaxPool2d``, side by side.

For each built-in net with max-pooling it builds the net twice with the same weights, once with
``nn.MaxPool2d`` put back, checks that the logits are bit-identical, and times, in rotating order,
``--repeats`` rounds of: a no-grad forward of a batch (what Square, the cascade's predictions and
every evaluation forward run) and a forward + input-gradient backward (what attack steps run; the
fast path is off there, so this ratio should read ~1.00). Prints median (range) of old ÷ new::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_maxpool.py --threads 1 --batch 100 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from robustopt.models import build
from robustopt.models.pool import use_torch_pools


def with_nn_pool(net: nn.Module, spec: str) -> nn.Module:
    plain = build(spec, {}, mean=(0.1307,), std=(0.3081,), num_classes=10, input_shape=(1, 28, 28)).eval()
    plain.load_state_dict(net.state_dict())
    return use_torch_pools(plain)


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="passes per timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"# threads {torch.get_num_threads()}, batch {args.batch}, torch {torch.__version__}, load {load:.2f}")
    for spec in ("small-cnn", "paper-mnist"):
        torch.manual_seed(0)
        new = build(spec, {}, mean=(0.1307,), std=(0.3081,), num_classes=10, input_shape=(1, 28, 28)).eval()
        old = with_nn_pool(new, spec)
        x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
        with torch.no_grad():
            assert torch.equal(new(x), old(x)), "logits differ"

        def forward(m, x=x):
            with torch.no_grad():
                m(x)

        def gradient(m, x=x, y=y):
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(m(xx), y), xx)

        ratios: dict[str, list[float]] = {"forward": [], "forward+backward": []}
        for r in range(args.repeats):
            for kind, fn in (("forward", forward), ("forward+backward", gradient)):
                pair = [(old, "old"), (new, "new")][:: 1 if r % 2 else -1]
                t = {name: timed(lambda m=m, fn=fn: fn(m), args.calls) for m, name in pair}
                ratios[kind].append(t["old"] / t["new"])
        for kind, rs in ratios.items():
            print(f"{spec:<12} {kind:<17} nn.MaxPool2d ÷ robustopt: {statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})")
    print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
