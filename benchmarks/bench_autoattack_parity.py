"""AutoAttack parity: robustopt's ``autoattack`` against the reference AutoAttack (and torchattacks') on the same model.

Run by hand in a private venv that holds the peers (see benchmarks/README.md; never robustopt dependencies)::

    /tmp/aavenv/bin/python benchmarks/bench_autoattack_parity.py --run pretrained:mnist-linf-0.3@0.3 \
        --images 100 --threads 1 [--tools robustopt,reference,torchattacks-100] [--repeats 3] [--norm l2] [--device cuda]

For each ``RUN@EPS`` (a run directory or ``pretrained:NAME``, and a radius of the ``--norm``, linf or l2) it runs, on the first
``--images`` test images of the dataset the run was trained on (its ``config.json``; ``--data-dir`` says where
CIFAR-10 lives), one after the other in one process and in rotating order over ``--repeats``:

* ``robustopt``: ``autoattack`` version "standard" (APGD-CE, APGD-T, FAB-T: 100 iterations, 9 targets;
  Square: 5000 queries), exactly as ``evaluate --attack autoattack --no-sanity`` runs it, with a timer
  around each component;
* ``reference``: fra31/auto-attack's ``AutoAttack(norm="Linf" or "L2", version="standard", seed=0)``,
  ``run_standard_evaluation(x, y, bs=250)`` (its default batch), with its per-component robust counts
  and times read through its ``EvaluationState``;
* ``torchattacks``: ``torchattacks.AutoAttack(version="standard", seed=0)`` as shipped; its APGD, APGD-T
  and FAB keep torchattacks' default of **10** iterations, so it is a cheaper measurement than the
  reference's standard version;
* ``torchattacks-100``: the same four torchattacks components with the standard budgets (100 iterations).

Every tool gets the same model object (so a faster model, e.g. robustopt's max-pool, speeds up every
tool alike, and the ratio compares the attacks). Printed per tool: robust accuracy, robust count after each
component, median wall time, per-example agreement of the robust masks with robustopt's (``ours only`` =
robust for robustopt but broken by the peer: the points where robustopt is the weaker attack), and
robustopt's time ÷ the tool's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from robustopt.cli.loaders import load_run
from robustopt.evaluation.attacks._common import cascade
from robustopt.evaluation.attacks.autoattack import STANDARD, standard_components
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import attack_state

PEER_NORM = {"linf": "Linf", "l2": "L2"}  # the peers' names for the norms their standard versions cover
Cascade = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, int]]]


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(y), batch)])


def _timed(name: str, attack: Callable, seconds: dict[str, float]) -> Callable:
    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return attack(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t

    return run


def robustopt_cascade(model: nn.Module, threat: ThreatModel) -> Cascade:
    """robustopt's ``autoattack`` exactly as it runs, with a timer around each component."""

    def run(x, y):
        stats: dict[str, int] = {}
        seconds: dict[str, float] = {}
        comps = standard_components(threat.norm, **{k: STANDARD[k] for k in ("steps", "n_targets", "queries", "seed")},
                                    device=x.device)  # fmt: skip
        with attack_state(model, "autoattack"):
            x_adv = cascade(model, x, y, threat, [(n, _timed(n, a, seconds)) for n, a in comps], stats)
        stats.update({f"{n} s": round(v, 1) for n, v in seconds.items()})
        return x_adv, stats

    return run


def reference_cascade(model: nn.Module, threat: ThreatModel) -> Cascade:
    """The reference AutoAttack (fra31/auto-attack), version "standard", seed 0, batches of 250 (its default).

    Installed from its public source into the benchmark's private venv; never a robustopt dependency.
    Its per-component robust counts and times are read by wrapping its ``EvaluationState.add_run_attack``,
    which it calls once after each component.
    """
    import autoattack
    from autoattack import autoattack as aa_module

    def run(x, y):
        adversary = autoattack.AutoAttack(model, norm=PEER_NORM[threat.norm], eps=threat.eps, version="standard", seed=0,
                                          verbose=False, device=str(x.device))  # fmt: skip
        stats: dict[str, int] = {"clean": int(_correct(model, x, y).sum())}
        state_cls, last = aa_module.EvaluationState, [time.perf_counter()]
        original = state_cls.add_run_attack

        def add_run_attack(state, attack):
            now = time.perf_counter()
            stats[attack], stats[f"{attack} s"] = int(state.robust_flags.sum()), round(now - last[0], 1)
            last[0] = now
            return original(state, attack)

        state_cls.add_run_attack = add_run_attack
        try:
            last[0] = time.perf_counter()
            x_adv = adversary.run_standard_evaluation(x, y, bs=250)
        finally:
            state_cls.add_run_attack = original
        return x_adv, stats

    return run


def torchattacks_cascade(model: nn.Module, threat: ThreatModel, steps: int | None) -> Cascade:
    """torchattacks' standard components; ``steps=None`` keeps them as ``AutoAttack`` builds them."""
    import torchattacks

    norm, eps = PEER_NORM[threat.norm], threat.eps

    if steps is None:
        shipped = torchattacks.AutoAttack(model, norm=norm, eps=eps, version="standard", n_classes=10, seed=0)
        attacks = shipped._autoattack.attacks
    else:
        attacks = [
            torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0),
            torchattacks.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1, n_classes=10, seed=0),
            torchattacks.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
            torchattacks.Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1, seed=0),
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


TOOLS = {
    "robustopt": robustopt_cascade,
    "reference": reference_cascade,
    "torchattacks": lambda model, threat: torchattacks_cascade(model, threat, None),
    "torchattacks-100": lambda model, threat: torchattacks_cascade(model, threat, 100),
}


def available(names: list[str]) -> list[str]:
    """The requested tools that import here (robustopt always does); a note for each that does not."""
    found = []
    for name in names:
        module = {"reference": "autoattack", "torchattacks": "torchattacks", "torchattacks-100": "torchattacks"}.get(name)
        try:
            if module:
                __import__(module)
            found.append(name)
        except ImportError as e:
            print(f"# skipping {name}: not importable ({e})")
    return found


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, names: list[str], repeats: int) -> dict:
    """Each tool ``repeats`` times, in rotating order; the last run's outputs and every run's wall time."""
    out: dict[str, dict] = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(x)
            t = time.perf_counter()
            x_adv, stats = TOOLS[name](model, threat)(x, y)
            sync(x)
            seconds = time.perf_counter() - t
            delta = threat.norm_of(x_adv - x)
            robust = _correct(model, x_adv, y) & _correct(model, x, y) & (delta <= threat.eps + 1e-6 * max(1.0, threat.eps))
            runs = out.get(name, {}).get("runs", []) + [seconds]
            out[name] = {"seconds": statistics.median(runs), "runs": runs, "stats": stats, "robust": robust,
                         "max_norm": float(delta.max())}  # fmt: skip
            print(f"# {name} run {r + 1}: {seconds:.1f} s, {int(robust.sum())} robust, {stats}", flush=True)
    return out


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def report(label: str, threat: ThreatModel, res: dict[str, dict], n: int) -> dict:
    ours = res["robustopt"]["robust"]
    base = res["robustopt"]["seconds"]
    print(f"\n## {label}, {threat.norm} eps={threat.eps}, {n} images")
    print(f"{'tool':<18}{'robust %':>9}{'clean':>7}{'apgd-ce':>9}{'apgd-t':>8}{'fab-t':>7}{'square':>8}{'seconds':>9}"
          f"{'agree %':>9}{'ours only':>10}{'theirs only':>12}{'ours ÷ theirs':>15}")  # fmt: skip
    rows = {}
    for name, r in res.items():
        s = r["stats"]
        agree = float((r["robust"] == ours).float().mean()) * 100
        ours_only, theirs_only = int((ours & ~r["robust"]).sum()), int((r["robust"] & ~ours).sum())
        acc = float(r["robust"].float().mean()) * 100
        print(f"{name:<18}{acc:>9.1f}{s['clean']:>7}{s['apgd-ce']:>9}{s['apgd-t']:>8}{s['fab-t']:>7}{s['square']:>8}"
              f"{r['seconds']:>9.1f}{agree:>9.1f}{ours_only:>10}{theirs_only:>12}{base / r['seconds']:>15.3f}")  # fmt: skip
        rows[name] = {"robust_accuracy": acc, "components": s, "seconds": r["seconds"], "runs": r["runs"], "agreement": agree,
                      "ours_only": ours_only, "theirs_only": theirs_only, "max_norm": r["max_norm"]}  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="RUN_DIR@EPS (repeatable)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--norm", default="linf", choices=sorted(PEER_NORM), help="the threat's norm (version standard of both)")
    p.add_argument("--data-dir", default=None, help="where CIFAR-10 lives (MNIST is bundled)")
    p.add_argument("--tools", default="robustopt,reference", help=f"comma-separated, of {', '.join(TOOLS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool, in rotating order; the median time is reported")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# {datetime.date.today()} device={dev} threads={torch.get_num_threads()} torch={torch.__version__}")
    figures = {}
    for spec in args.run:
        run_dir, _, eps = spec.rpartition("@")
        data_dir = Path(args.data_dir) if args.data_dir else None
        loaded = load_run(run_dir, args.device, args.images, data_dir, trust_code=False)  # as `evaluate` loads it
        model, x, y = loaded.model, loaded.x.to(loaded.device), loaded.y.to(loaded.device)
        names = available(["robustopt"] + [t for t in args.tools.split(",") if t != "robustopt"])
        threat = ThreatModel(args.norm, float(eps))
        res = compare(model, x, y, threat, names, args.repeats)
        figures[spec] = report(run_dir, threat, res, len(y))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
