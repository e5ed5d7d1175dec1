"""Ablation of issue 18 item 3: the strong MNIST recipe with and without each technique, at the same budget.

Variants (each trains the recipe with one change, same epochs, seed and data):

* ``recipe``: as shipped (EMA, ε ramp; AWP and label smoothing off);
* ``no-ema``, ``no-ramp``: the recipe less one technique;
* ``plus-awp``: the recipe with AWP, γ 0.005 (Wu et al.'s value);
* ``plus-label-smoothing``: the recipe with label smoothing 0.1;
* ``none``: none of the four (plain TRADES-5 at the same budget).

Each final ``model.safetensors`` (the EMA where there is one: the model of record) is measured on the first
``--n-test`` test images: clean accuracy and PGD-40 with 2 restarts (step 2.5ε/40, random starts, seeded).
Finished variants are not retrained (their ``summary.json`` exists) nor re-measured (``ablation-N.json``), so an
interrupted ablation can be run again; a variant whose run directory was trained with another configuration (the
recipe changed since) is refused with the keys that differ, rather than reported under the new recipe's name.
The table goes to ``--doc`` with the command, the budget, the times and the machine.

Full size (about 6 × 70 min on one thread; not run):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ablation_mnist.py --out runs/ablation-mnist

On both cores of a 2-core machine, ``--threads 2`` (with ``OMP_NUM_THREADS=2``) takes about 0.6 of the one-thread
time (a TRADES-5 batch of 100: 0.34 s against 0.58 s).

A smoke run of the script itself (minutes):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ablation_mnist.py --out /tmp/abl --subset 500 --epochs 1 --n-test 100 \
        --doc /tmp/abl/ablation.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from robustopt import ThreatModel, evaluate, load_model, train
from robustopt.data.datasets import load_dataset, to_float
from robustopt.errors import RunDirError
from robustopt.recipes import load_recipe
from robustopt.rundir import changed_keys as changed_run_keys
from robustopt.training.config import TrainConfig

VARIANTS = {
    "recipe": {},
    "no-ema": {"ema_decay": None},
    "no-ramp": {"eps_ramp_epochs": 0.0},
    "plus-awp": {"awp_gamma": 0.005},
    "plus-label-smoothing": {"label_smoothing": 0.1},
    "none": {"ema_decay": None, "eps_ramp_epochs": 0.0, "awp_gamma": None, "label_smoothing": 0.0},
}


def budget(cfg: TrainConfig, epochs: int | None, subset: int | None) -> TrainConfig:
    """The recipe at another budget: ramp and milestones scaled with the epochs, the held-out check with the data."""
    changes: dict = {"subset": subset} if subset else {}
    if epochs is not None and epochs != cfg.epochs:
        scale = epochs / cfg.epochs
        changes.update(epochs=epochs, eps_ramp_epochs=cfg.eps_ramp_epochs * scale,
                       milestones=sorted({max(1, round(m * scale)) for m in cfg.milestones}))  # fmt: skip
    if subset and cfg.eval_pgd and subset <= 2 * cfg.eval_pgd:
        changes["eval_pgd"] = max(0, subset // 4)
    return dataclasses.replace(cfg, **changes)


def changed_keys(cfg: TrainConfig, run: Path) -> dict[str, tuple]:
    """Training keys whose value in ``run``'s config.json differs from ``cfg``'s: {key: (recorded, now)}; {} for a new run."""
    return changed_run_keys(run, cfg.training_keys()) if (run / "config.json").exists() else {}


def measure(run: Path, n_test: int, eps: float) -> dict:
    data = load_dataset("mnist")
    x, y = to_float(data.x_test[:n_test]), data.y_test[:n_test]
    model = load_model(run)
    t0 = time.time()
    result = evaluate(model, x, y, ThreatModel("linf", eps), "pgd", steps=40, restarts=2, sanity=False, progress=False)
    return {"clean": result.clean_accuracy, "pgd40x2": result.adversarial_accuracy, "eval_seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="mnist-linf-0.3-strong")
    ap.add_argument("--out", type=Path, required=True, help="a folder for one run directory per variant")
    ap.add_argument("--epochs", type=int, default=None, help="another budget (default: the recipe's)")
    ap.add_argument("--subset", type=int, default=None, help="train on the first N training images (smoke runs)")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--doc", type=Path, default=Path("docs/ablation-mnist.md"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and measuring (default 1)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        print(f"ablation_mnist: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    base = budget(load_recipe(args.recipe), args.epochs, args.subset)
    rows = []
    for name in args.variants.split(","):
        cfg, out = dataclasses.replace(base, **VARIANTS[name]), args.out / name
        try:
            stale = changed_keys(cfg, out)
        except RunDirError as e:  # a config.json that robustopt did not write, or a damaged one
            print(f"ablation_mnist: error: {e}", file=sys.stderr)
            return 2
        if stale:
            what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in stale.items())
            print(f"ablation_mnist: error: {out} was trained with another configuration: {what}; "
                  "use a new --out or remove it", file=sys.stderr)  # fmt: skip
            return 2
        if not (out / "summary.json").exists():
            train(cfg, out, resume=(out / "checkpoint.safetensors").exists(), progress=False)
        summary = json.loads((out / "summary.json").read_text())
        cached = out / f"ablation-{args.n_test}.json"  # measured once: re-running only rewrites the table
        if not cached.exists():
            row = {"variant": name, "train_seconds": summary["train_seconds"], **measure(out, args.n_test, base.pixel_eps)}
            cached.write_text(json.dumps(row))
        rows.append(json.loads(cached.read_text()))
        print(json.dumps(rows[-1]), flush=True)
    write_doc(args, base, rows)
    return 0


def noise_points(rows: list[dict], n: int) -> float:
    """Two standard errors of the difference of two variants' PGD accuracies (independent runs, n images), in points."""
    p = sum(r["pgd40x2"] for r in rows) / len(rows)
    return 100 * 2 * math.sqrt(2 * p * (1 - p) / n)


def write_doc(args: argparse.Namespace, cfg: TrainConfig, rows: list[dict]) -> None:
    full = load_recipe(args.recipe)
    budget_note = (f" That is {cfg.epochs}/{full.epochs} of the recipe's budget: at this length the ε ramp takes "
                   f"{cfg.eps_ramp_epochs:.2g} epochs and the EMA's warm-up keeps its horizon short, so the table says what "
                   "each technique does early in training, not what it adds to the full run."
                   if cfg.epochs != full.epochs else "")  # fmt: skip
    lines = [
        "# MNIST ℓ∞ 0.3: what each training technique buys",
        "",
        f"Recipe `{args.recipe}` (TRADES-5 on small-cnn), each variant at the same budget: {cfg.epochs} "
        f"epoch{'s' if cfg.epochs != 1 else ''}"
        f"{f' on the first {cfg.subset} training images' if cfg.subset else ''}, seed {cfg.seed}, "
        f"{args.threads} thread{'s' if args.threads != 1 else ''}. "
        f"Clean and PGD-40×2 accuracy (step 2.5ε/40, 2 random restarts) of the final model.safetensors (the EMA where "
        f"there is one) on the first {args.n_test} test images.",
        "",
        "| variant | clean | PGD-40×2 | training time |",
        "|---|---|---|---|",
        *(f"| {r['variant']} | {100 * r['clean']:.2f}% | {100 * r['pgd40x2']:.2f}% | {r['train_seconds'] / 60:.1f} min |"
          for r in rows),
        "",
        f"One seed each. Two variants' PGD-40×2 figures differ beyond sampling noise only if they are more than "
        f"≈ {noise_points(rows, args.n_test):.1f} points apart (two standard errors of a difference on {args.n_test} "
        f"images); seed-to-seed variation adds to that.{budget_note} Machine: {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}. Command:",
        "",
        f"    OMP_NUM_THREADS={args.threads} .venv/bin/python scripts/ablation_mnist.py {' '.join(sys.argv[1:])}",
        "",
    ]  # fmt: skip
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
