"""AutoAttack parity: robustopt's ``autoattack`` against torchattacks' AutoAttack on the same models and images.

Run by hand in the peers' venv (see benchmarks/README.md; torchattacks installed with --no-deps)::

    /tmp/benchvenv/bin/python benchmarks/bench_autoattack_parity.py --run runs/std@0.1 --run runs/pgd@0.2 \\
        --images 1000 --threads 1 [--device cuda]

For each ``RUN@EPS`` (a robustopt run directory and an ℓ∞ radius) it runs, on the first ``--images``
MNIST test images, one after the other in one process:

* ``robustopt``: ``autoattack`` version "standard" (APGD-CE, APGD-T, FAB-T: 100 iterations, 9 targets;
  Square: 5000 queries);
* ``torchattacks``: ``torchattacks.AutoAttack(version="standard", seed=0)`` as shipped; its APGD, APGD-T
  and FAB keep torchattacks' default of **10** iterations, so it is a cheaper measurement than the
  reference's standard version;
* ``torchattacks-100``: the same four torchattacks components with the standard budgets (100 iterations),
  the like-for-like comparison.

Each torchattacks cascade is run as its ``MultiAttack`` runs it (every attack on the points still
classified correctly), written out here so that the robust count after each component can be printed.
Printed per tool: robust accuracy, robust count after each component, wall time, and per-example
agreement of the robust masks with robustopt's (``ours only`` = robust for robustopt but broken by the
peer: the points where robustopt is the weaker attack).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from robustopt.data.datasets import load_dataset, to_float
from robustopt.evaluation.attacks.autoattack import autoattack
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel

Cascade = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, int]]]


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(y), batch)])


def robustopt_cascade(model: nn.Module, eps: float) -> Cascade:
    def run(x, y):
        stats: dict[str, int] = {}
        x_adv = autoattack(model, x, y, ThreatModel("linf", eps), stats=stats)
        return x_adv, stats

    return run


def torchattacks_cascade(model: nn.Module, eps: float, steps: int | None) -> Cascade:
    """torchattacks' standard components; ``steps=None`` keeps them as ``AutoAttack`` builds them."""
    import torchattacks

    if steps is None:
        shipped = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
        attacks = shipped._autoattack.attacks
    else:
        attacks = [
            torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0),
            torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=10, seed=0),
            torchattacks.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
            torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
        ]
    names = ["apgd-ce", "apgd-t", "fab-t", "square"]

    def run(x, y):  # MultiAttack.forward, with the counts kept
        x_adv, fails = x.clone(), torch.arange(len(y), device=x.device)
        fails = fails[_correct(model, x, y)]
        stats = {"clean": len(fails)}
        for name, atk in zip(names, attacks, strict=False):
            if len(fails):
                adv = atk(x[fails], y[fails])
                ok = _correct(model, adv, y[fails])
                x_adv[fails[~ok]] = adv[~ok]
                fails = fails[ok]
            stats[name] = len(fails)
        return x_adv, stats

    return run


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, dict]:
    tools: dict[str, Cascade] = {"robustopt": robustopt_cascade(model, eps)}
    try:
        tools["torchattacks"] = torchattacks_cascade(model, eps, None)
        tools["torchattacks-100"] = torchattacks_cascade(model, eps, 100)
    except ImportError as e:
        print(f"# skipping torchattacks: not importable ({e})")
    out: dict[str, dict] = {}
    for name, run in tools.items():
        sync(x)
        t = time.perf_counter()
        x_adv, stats = run(x, y)
        sync(x)
        seconds = time.perf_counter() - t
        delta = (x_adv - x).flatten(1).abs().amax(1)
        robust = _correct(model, x_adv, y) & _correct(model, x, y)
        out[name] = {"seconds": seconds, "stats": stats, "robust": robust, "max_linf": float(delta.max())}
    return out


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def report(label: str, eps: float, res: dict[str, dict], n: int) -> dict:
    ours = res["robustopt"]["robust"]
    print(f"\n## {label}, linf eps={eps}, {n} images")
    print(f"{'tool':<18}{'robust %':>9}{'clean':>7}{'apgd-ce':>9}{'apgd-t':>8}{'fab-t':>7}{'square':>8}{'seconds':>9}"
          f"{'agree %':>9}{'ours only':>10}{'theirs only':>12}")  # fmt: skip
    rows = {}
    for name, r in res.items():
        s = r["stats"]
        agree = float((r["robust"] == ours).float().mean()) * 100
        ours_only, theirs_only = int((ours & ~r["robust"]).sum()), int((r["robust"] & ~ours).sum())
        acc = float(r["robust"].float().mean()) * 100
        print(f"{name:<18}{acc:>9.1f}{s['clean']:>7}{s['apgd-ce']:>9}{s['apgd-t']:>8}{s['fab-t']:>7}{s['square']:>8}"
              f"{r['seconds']:>9.1f}{agree:>9.1f}{ours_only:>10}{theirs_only:>12}")  # fmt: skip
        rows[name] = {"robust_accuracy": acc, "components": s, "seconds": r["seconds"], "agreement": agree,
                      "ours_only": ours_only, "theirs_only": theirs_only, "max_linf": r["max_linf"]}  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="RUN_DIR@EPS (repeatable)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    x, y = to_float(data.x_test[: args.images]).to(args.device), data.y_test[: args.images].to(args.device)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# {datetime.date.today()} device={dev} threads={torch.get_num_threads()} torch={torch.__version__}")
    figures = {}
    for spec in args.run:
        run_dir, _, eps = spec.rpartition("@")
        model = load_model(run_dir, args.device)
        figures[spec] = report(run_dir, float(eps), compare(model, x, y, float(eps)), len(y))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
