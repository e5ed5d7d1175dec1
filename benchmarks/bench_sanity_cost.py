"""What the evaluator's sanity checks cost, as a share of the evaluated attack's own time.

    .venv/bin/python benchmarks/bench_sanity_cost.py --run RUN_DIR --attack pgd --steps 20 --eps 0.2 --images 500

Runs ``evaluate`` with the checks off, then with each ``--modes`` (``light``: the default, ``full``: the
heavy version), on the same images, and prints sanity seconds ÷ attack seconds. With an older robustopt
on PYTHONPATH (one whose ``evaluate`` takes only ``sanity=True``) the "before" figure is the total time
with checks minus the time without them.
"""

from __future__ import annotations

import argparse
import time

import torch

from robustopt.data.datasets import load_dataset, to_float
from robustopt.evaluation.evaluate import evaluate
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--attack", default="pgd")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--modes", default="light,full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    x, y = to_float(data.x_test[: args.images]), data.y_test[: args.images]
    model = load_model(args.run, args.device)
    threat = ThreatModel("linf", args.eps)
    kw = {"steps": args.steps, "progress": False, "device": args.device}
    t = time.perf_counter()
    base = evaluate(model, x, y, threat, args.attack, sanity=False, **kw)
    t_attack = time.perf_counter() - t
    print(f"# {args.attack} steps={args.steps} linf eps={args.eps} n={len(y)} device={args.device}")
    print(f"attack alone: {t_attack:.1f} s, robust accuracy {base['adversarial_accuracy']:.3f}")
    for mode in args.modes.split(","):
        t = time.perf_counter()
        res = evaluate(model, x, y, threat, args.attack, sanity=mode if mode != "before" else True, **kw)
        total = time.perf_counter() - t
        spent = res.get("seconds_sanity", total - t_attack)
        failed = [k for k, c in res.sanity.items() if not c["passed"]]
        plan = res.get("sanity_plan", {})
        print(f"{mode:>6}: checks {spent:.1f} s = {spent / t_attack:.2f} x the attack; n={plan.get('n', 200)} "
              f"plan cost/attack cost={plan.get('cost', float('nan')) / plan.get('attack_cost', float('nan')):.2f}; "
              f"failed: {failed or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
