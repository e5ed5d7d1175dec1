"""Evaluate test images [start, stop) of a run with one attack, in its own process, and write the result as JSON.

``robustopt evaluate --subset N`` evaluates the first N test images in one process. On a machine with
c cores, c one-thread processes over disjoint ranges finish sooner than one c-thread process (the
attacks' small batches do not scale across threads), so the shipped model's figures were taken as
two halves, merged by ``--merge``. Each half calls the same :func:`robustopt.evaluate` as the CLI.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/evaluate_range.py RUN --attack autoattack --eps 0.3 \\
        --start 0 --stop 500 --out runs/aa-0.json &
    OMP_NUM_THREADS=1 .venv/bin/python scripts/evaluate_range.py RUN --attack autoattack --eps 0.3 \\
        --start 500 --stop 1000 --out runs/aa-1.json; wait
    .venv/bin/python scripts/evaluate_range.py --merge runs/aa-0.json runs/aa-1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from robustopt import ThreatModel, evaluate, load_model
from robustopt.data.datasets import load_dataset, to_float


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    x, y = to_float(data.x_test[args.start : args.stop]), data.y_test[args.start : args.stop]
    t0 = time.time()
    result = evaluate(load_model(args.run), x, y, ThreatModel(args.norm, args.eps), args.attack, steps=args.steps,
                      restarts=args.restarts, sanity=args.sanity, progress=False)  # fmt: skip
    out = {"run": args.run, "start": args.start, "stop": args.stop, "wall_seconds": time.time() - t0,
           "robust": [int(i) for i in result.robust_mask.nonzero().squeeze(1) + args.start], **result.to_dict()}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "robust"}))


def merge(paths: list[str]) -> None:
    parts = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda d: d["start"])
    n = sum(p["n"] for p in parts)
    clean = sum(p["clean_accuracy"] * p["n"] for p in parts)
    robust = sum(len(p["robust"]) for p in parts)
    comps: dict[str, int] = {}
    for p in parts:
        for k, v in (p.get("components") or {}).items():
            comps[k] = comps.get(k, 0) + v
    ranges = ", ".join(f"[{p['start']}, {p['stop']})" for p in parts)
    walls = ", ".join(f"{p['wall_seconds']:.0f} s" for p in parts)
    print(f"{parts[0]['attack']} {parts[0]['norm']} eps={parts[0]['eps']} on {n} images ({ranges}): "
          f"clean {clean / n:.2%} ({round(clean)}), robust {robust / n:.2%} ({robust}); components {comps}; "
          f"wall {walls}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a run directory or pretrained:NAME")
    ap.add_argument("--merge", nargs="+", help="merge these JSON results and print the totals")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--attack", default="autoattack")
    ap.add_argument("--norm", default="linf")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--sanity", default="off", choices=["off", "light", "full"])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge)
        return 0
    if not args.run or not args.out:
        ap.error("give RUN and --out (or --merge FILES)")
    args.sanity = False if args.sanity == "off" else args.sanity
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
