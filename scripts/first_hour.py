"""Three first-hour jobs outside the MNIST/CIFAR image path (issue 16's done-when), end to end.

1. a two-class tabular MLP on feature vectors (robustopt.fit, then every attack through robustopt.evaluate);
2. a non-square colour CNN (3 x 16 x 12 inputs, 3 classes), the same way;
3. a folder of 16x16 digit PNGs made from MNIST, through the CLI (train --data FOLDER, evaluate --attack X).

Each trains, evaluates with every registered attack and the default light sanity checks, and reloads. Prints one
table row per (job, attack): clean and adversarial accuracy, failed checks, seconds. Run it by hand:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/first_hour.py --out /tmp/first-hour
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from robustopt import ThreatModel, evaluate, fit, load_model
from robustopt.data.datasets import load_dataset
from robustopt.evaluation.attacks import ATTACKS

SMALL = {"steps": 5}  # budgets small enough for a CPU; every attack keeps its own defaults otherwise


def _row(job: str, attack: str, res) -> str:
    failed = [k for k, c in (res.get("sanity") or {}).items() if not c["passed"]]
    return (f"| {job} | {attack} | {res['clean_accuracy']:.3f} | {res['adversarial_accuracy']:.3f} | "
            f"{', '.join(failed) or 'none'} | {res['seconds']:.1f} |")  # fmt: skip


def _every_attack(job: str, model: nn.Module, x, y, threat: ThreatModel) -> list[str]:
    rows = []
    for name in ATTACKS:
        steps = None if name in ("fgsm", "fgm") else (50 if name == "square" else 5)
        res = evaluate(model, x, y, threat, name, steps=steps, progress=False, log=lambda s: None)
        rows.append(_row(job, name, res.to_dict()))
    return rows


def tabular(out: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 20, generator=g)
    y = ((x[:, :5].sum(1) - x[:, 5:10].sum(1)) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    threat = ThreatModel("linf", 0.02)
    fit(model, (x[:1600], y[:1600]), threat, out=out / "tabular", overwrite=True, epochs=5, batch_size=64, lr=0.1,
        test_data=(x[1600:], y[1600:]), log=lambda s: None)  # fmt: skip
    model = load_model(out / "tabular", model=model)
    return _every_attack("tabular MLP, 2 classes", model, x[1600:1800], y[1600:1800], threat)


def colour(out: Path) -> list[str]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(1500) % 3
    x = torch.rand(1500, 3, 16, 12, generator=g) * 0.8
    for c in range(3):
        x[y == c, c, 4:12, 3:9] += 0.2  # the class is a colour patch in the middle (inputs stay in [0, 1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 6, 3))
    threat = ThreatModel("linf", 0.05)
    fit(model, (x[:1200], y[:1200]), threat, out=out / "colour", overwrite=True, epochs=8, batch_size=50, lr=0.02,
        method="pgd", steps=3, test_data=(x[1200:], y[1200:]), log=lambda s: None)  # fmt: skip
    model = load_model(out / "colour", model=model)
    return _every_attack("colour CNN 3x16x12, 3 classes", model, x[1200:1400], y[1200:1400], threat)


def digit_folder(out: Path) -> Path:
    mnist = load_dataset("mnist")
    root = out / "digits16"
    for split, xs, ys, n in (("train", mnist.x_train, mnist.y_train, 3000), ("test", mnist.x_test, mnist.y_test, 500)):
        for i in range(n):
            d = root / split / str(int(ys[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xs[i, 0].numpy()).resize((16, 16), Image.BILINEAR).save(d / f"{i}.png")
    return root


def folder(out: Path) -> list[str]:
    root = digit_folder(out)
    run = out / "folder-run"
    cli = [sys.executable, "-m", "robustopt"]
    subprocess.run([*cli, "train", "--data", str(root), "--model", "mlp", "--method", "robust", "--eps", "0.1",
                    "--epochs", "5", "--lr", "0.05", "--out", str(run), "--overwrite"], check=True)  # fmt: skip
    rows = []
    for name in ATTACKS:
        flags = [] if name in ("fgsm", "fgm") else ["--steps", "50" if name == "square" else "5"]
        done = subprocess.run([*cli, "evaluate", str(run), "--attack", name, "--subset", "200", "--json", *flags],
                              capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(_row("16x16 digit folder (CLI)", name, json.loads(done.stdout)))
    load_model(run)  # a built-in net reloads by name
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("first-hour"))
    args = ap.parse_args()
    t0 = time.time()
    print("| job | attack | clean | adversarial | failed checks | seconds |\n|---|---|---|---|---|---|")
    for job in (tabular, colour, folder):
        for row in job(args.out):
            print(row, flush=True)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
