"""APGD at its pass floor: robustopt's ``apgd`` against APGD as first written, side by side in one process.

Run by hand (the dev venv is fine)::

    .venv/bin/python benchmarks/bench_apgd_floor.py --threads 1 --images 200 --steps 100 --repeats 5

"As first written" (robustopt before issue 19, reproduced here) evaluates every iterate with a
forward and an input-gradient backward pass, the last one included, and recomputes the gradient
of the whole batch after every checkpoint at which an example restarts from its best point. The
current ``apgd`` gives the last iterate a forward only and restarts with the gradient stored with
the best point: N input-gradient passes and N + 1 forwards for N iterations. Both return the same
adversarial examples (checked here, and in ``tests/test_speed_invariants.py``). Each repeat times
both once, in rotating order; reported are the pass counts, and the median and range of the time
ratio within a repeat. The model is ``--run``'s, or a paper-mnist net trained here for one epoch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
from bench_pgd_throughput import get_model, model_label
from torch import nn

from robustopt.data.datasets import load_dataset, to_float
from robustopt.evaluation.attacks.apgd import MOMENTUM, RHO, apgd, checkpoints
from robustopt.evaluation.attacks.losses import get_loss
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import WorstCase, attack_state


class Counting(nn.Module):
    """Counts forwards, and forwards that build a graph (each is followed by one input-gradient backward)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.forwards, self.with_grad = net, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        self.with_grad += torch.is_grad_enabled()
        return self.net(x)


def reference_apgd_run(model, x, y, threat, steps, loss_fn, generator) -> WorstCase:  # type: ignore[no-untyped-def]
    """One run (one restart) of APGD as first written: the worst iterate per example, with its loss and whether it fools.

    A forward and an input-gradient backward at every iterate, the last one included, and the
    whole batch's gradient recomputed after every checkpoint at which an example restarts from its
    best point. ``tests/test_speed_invariants.py`` checks ``apgd`` against this loop bit for bit.
    """
    eps = threat.radii(x)

    def grad_at(z):  # type: ignore[no-untyped-def]
        with torch.enable_grad():
            z = z.clone().requires_grad_(True)
            logits = model(z)
            return torch.autograd.grad(loss_fn(logits, y).sum(), z)[0], logits.detach()

    def step(x_k, x_prev, grad, eta, a):  # type: ignore[no-untyped-def]
        z = threat.project(x_k + eta.view(-1, 1, 1, 1) * threat.ascent_direction(grad, iterative=True), x, eps)
        return threat.project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x, eps)

    x_k = threat.random_init(x, generator, eps)
    grad, logits = grad_at(x_k)
    cur = loss_fn(logits, y)
    best = WorstCase(x_k)
    best.update(x_k, cur, logits.argmax(1) != y)
    x_max, f_max, x_prev, eta = x_k.clone(), cur.clone(), x_k.clone(), 2 * eps
    eta_at, fmax_at, ups, ckpts, last = eta.clone(), f_max.clone(), torch.zeros_like(cur), checkpoints(steps), 0
    for k in range(steps):
        x_new = step(x_k, x_prev, grad, eta, 1.0 if k == 0 else MOMENTUM)
        grad, logits = grad_at(x_new)
        new = loss_fn(logits, y)
        best.update(x_new, new, logits.argmax(1) != y)
        ups += (new > cur).float()
        improved = new > f_max
        x_max[improved], f_max = x_new[improved], torch.where(improved, new, f_max)
        x_prev, x_k, cur = x_k, x_new, new
        if k + 1 in ckpts:
            stalled = (ups < RHO * (k + 1 - last)) | ((eta == eta_at) & (f_max == fmax_at))
            eta_at, fmax_at = eta.clone(), f_max.clone()
            eta = torch.where(stalled, eta / 2, eta)
            if stalled.any():
                x_k[stalled] = x_max[stalled]
                grad = grad_at(x_k)[0]
                cur = torch.where(stalled, f_max, cur)
            ups.zero_()
            last = k + 1
    return best


def apgd_as_first_written(model, x, y, threat, steps, loss, generator):  # type: ignore[no-untyped-def]
    """robustopt's APGD before issue 19 (one restart): :func:`reference_apgd_run` with frozen weights, x where it fails."""
    with attack_state(model):
        best = reference_apgd_run(model, x, y, threat, steps, get_loss(loss), generator)
    final = WorstCase(x)
    final.update(best.x, best.loss, best.fooled)
    return final.x


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory of a paper-mnist model (default: train one here)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--loss", default="ce", choices=("ce", "dlr"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    x, y = to_float(data.x_test[: args.images]), data.y_test[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        model = Counting(get_model(args.run, tmp).eval())
    threat = ThreatModel("linf", args.eps)
    runs = {
        "apgd (now)": lambda: apgd(model, x, y, threat, steps=args.steps, loss=args.loss, generator=_gen()),
        "as first written": lambda: apgd_as_first_written(model, x, y, threat, args.steps, args.loss, _gen()),
    }
    print(f"# {datetime.date.today()}  {platform.machine()}  cpus={os.cpu_count()}  threads={torch.get_num_threads()}  ", end="")
    print(f"torch={torch.__version__}  load average {os.getloadavg()[0]:.2f}")
    print(
        f"# {model_label(args.run)}, {len(y)} MNIST test images, "
        f"APGD-{args.loss} linf eps={args.eps} steps={args.steps}, 1 restart"
    )
    out, passes, times = {}, {}, {name: [] for name in runs}
    for name, run in runs.items():
        model.forwards = model.with_grad = 0
        out[name] = run()
        passes[name] = (model.forwards, model.with_grad)
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % 2 :] + names[: r % 2]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    same = torch.equal(out[names[0]], out[names[1]])
    ratio = [b / a for a, b in zip(times[names[0]], times[names[1]], strict=True)]
    for name in names:
        f, b = passes[name]
        print(f"{name:<18} forwards {f:>4}  input-gradient backwards {b:>4}  median {statistics.median(times[name]):.2f} s")
    print(f"as first written ÷ now, time: {statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}); ", end="")
    print(f"adversarial examples identical: {same}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
