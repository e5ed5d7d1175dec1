"""PGD (ℓ∞, 10 steps) images per second: robustopt vs torchattacks vs ART, same model, same batch, one process.

Run by hand, in a separate environment that holds the peers (they are not robustopt dependencies)::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch                      # the CPU wheel is enough
    /tmp/benchvenv/bin/pip install -e . --no-deps numpy safetensors typer tqdm scipy
    /tmp/benchvenv/bin/pip install --no-deps torchattacks     # it imports without torchvision
    /tmp/benchvenv/bin/pip install adversarial-robustness-toolbox packaging
    /tmp/benchvenv/bin/python benchmarks/bench_pgd_throughput.py [--run RUN_DIR] [--images 500] [--repeats 5]

The three attacks run the same algorithm: no random start, step α = ε/4 in sign(∇ₓ) direction,
projection onto the ε-ball ∩ [0, 1] after each of 10 steps, so their adversarial accuracies
must agree (the check that the comparison is fair). Each repeat times every tool once,
in rotating order; reported are the median and range over repeats of each tool's time and of
robustopt's speed ÷ the tool's, taken within each repeat. A peer that is not importable is
skipped with a note. Always timed, needing no peer (issue 19):

* ``floor``: what PGD-10 cannot do without: 10 input-gradient passes with frozen weights and one
  forward pass (the last iterate's prediction), nothing else, at the points the attack visits;
* ``plain loop``: the loop as torchattacks writes it (mean loss, ``autograd.grad`` with the weights
  left trainable, sign step, clamps), written here;
* ``robustopt pgd()``: the evaluation attack, which also keeps each example's worst iterate.

The model is ``--run``'s, or a paper-mnist net trained here for one epoch by robust optimisation
(6k images, ε = 0.2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustopt.data.datasets import load_dataset, to_float
from robustopt.evaluation.attacks.pgd import pgd
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import frozen_parameters, perturb
from robustopt.training.config import TrainConfig
from robustopt.training.named import train

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,C,H,W), y (B,)) -> x_adv


def robustopt_attack(model: nn.Module, eps: float, alpha: float, steps: int) -> Attack:
    threat = ThreatModel("linf", eps)
    return lambda x, y: perturb(model, x, y, threat, steps=steps, step_size=alpha)


def pgd_attack(model: nn.Module, eps: float, alpha: float, steps: int) -> Attack:
    threat = ThreatModel("linf", eps)
    return lambda x, y: pgd(model, x, y, threat, steps=steps, step_size=alpha, random_start=False)


def iterates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> list[torch.Tensor]:
    """The points PGD visits, x_0 = x .. x_steps (the sign-and-clamp loop, the same points as robustopt's)."""
    points = [x]
    with frozen_parameters(model):
        for _ in range(steps):
            x_req = points[-1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
            points.append((x + (points[-1] + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1))
    return points


def floor_passes(model: nn.Module, points: list[torch.Tensor]) -> Attack:
    """The floor of PGD: an input-gradient pass with frozen weights at each iterate but the last, a forward at the last.

    At the attack's own iterates, because the cost of a pass depends on the point: on paper-mnist the passes at
    the final adversarial examples took ≈ 13% longer than at the clean images."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with frozen_parameters(model):
            for point in points[:-1]:
                x_req = point.detach().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
            with torch.no_grad():
                model(points[-1])
        return x

    return run


def plain_loop(model: nn.Module, eps: float, alpha: float, steps: int) -> Attack:
    """torchattacks' PGD (random_start=False) written out: mean loss, weights left trainable."""
    loss = nn.CrossEntropyLoss()

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone().detach()
        for _ in range(steps):
            adv.requires_grad = True
            grad = torch.autograd.grad(loss(model(adv), y), adv, retain_graph=False, create_graph=False)[0]
            adv = adv.detach() + alpha * grad.sign()
            adv = torch.clamp(x + torch.clamp(adv - x, min=-eps, max=eps), min=0, max=1).detach()
        return adv

    return run


def torchattacks_attack(model: nn.Module, eps: float, alpha: float, steps: int) -> Attack:
    import torchattacks

    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    return lambda x, y: atk(x, y)


def art_attack(model: nn.Module, eps: float, alpha: float, steps: int, shape: tuple[int, ...], batch: int) -> Attack:
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    est = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu"
    )
    atk = ProjectedGradientDescentPyTorch(
        est, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps, num_random_init=0, batch_size=batch, verbose=False
    )
    return lambda x, y: torch.from_numpy(atk.generate(x=x.numpy(), y=y.numpy()))


def model_label(run: str | None) -> str:
    """The architecture named in ``run``'s config.json (``paper-mnist`` for the net trained here), for the header."""
    if not run:
        return "paper-mnist"
    try:
        return str(json.loads((Path(run) / "config.json").read_text())["model"])
    except (OSError, ValueError, KeyError):
        return run


def get_model(run: str | None, tmp: str) -> nn.Module:
    if run:
        return load_model(run)
    cfg = TrainConfig(method="robust", eps=0.2, epochs=1, subset=6000, batch_size=50, lr=0.05, seed=0)
    train(cfg, tmp, device="cpu", progress=False, log=lambda s: None)
    return load_model(tmp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory of a paper-mnist model (default: train one here)")
    p.add_argument("--images", type=int, default=500, help="test images in the one batch")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    alpha = args.eps / 4
    data = load_dataset("mnist")
    x, y = to_float(data.x_test[: args.images]), data.y_test[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        model = get_model(args.run, tmp).eval()
    attacks: dict[str, Attack] = {
        "robustopt": robustopt_attack(model, args.eps, alpha, args.steps),
        "floor": floor_passes(model, iterates(model, x, y, args.eps, alpha, args.steps)),
        "plain loop": plain_loop(model, args.eps, alpha, args.steps),
        "robustopt pgd()": pgd_attack(model, args.eps, alpha, args.steps),
    }
    for name, make in (
        ("torchattacks", lambda: torchattacks_attack(model, args.eps, alpha, args.steps)),
        ("ART", lambda: art_attack(model, args.eps, alpha, args.steps, tuple(x.shape[1:]), len(y))),
    ):
        try:
            attacks[name] = make()
        except ImportError as e:
            print(f"# skipping {name}: not importable ({e})")
    print(f"# {datetime.date.today()}  {platform.machine()}  cpus={os.cpu_count()}  threads={torch.get_num_threads()}  ", end="")
    print(f"torch={torch.__version__}  load average {os.getloadavg()[0]:.2f}")
    print(
        f"# {model_label(args.run)}, {len(y)} MNIST test images in one batch, "
        f"PGD linf eps={args.eps} alpha={alpha} steps={args.steps}"
    )
    times = timed(attacks, x, y, args.repeats)
    adv = {n: attacks[n](x, y) for n in attacks if n != "floor"}
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        acc = {n: float((model(a).argmax(1) == y).float().mean()) for n, a in adv.items()}
    print(f"clean accuracy {clean:.3f}  (load average {os.getloadavg()[0]:.2f} at the end)\n")
    report(times, adv, acc, len(y))


def timed(attacks: dict[str, Attack], x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every attack, ``repeats`` times each, in rotating order after one warm-up call each."""
    names = list(attacks)
    for name in names:
        attacks[name](x, y)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            attacks[name](x, y)
            times[name].append(time.perf_counter() - t)
    return times


def report(times: dict[str, list[float]], adv: dict[str, torch.Tensor], acc: dict[str, float], n: int) -> None:
    """Median (range) images/s; tool time ÷ robustopt's and robustopt's ÷ floor, per repeat, median (range)."""

    def med(v: list[float]) -> str:
        return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"

    head = f"{'tool':<17}{'images/s':>9}{'tool ÷ robustopt time':>24}{'÷ floor time':>20}{'adv acc':>9}"
    print(f"{head}{'max |Δ|':>10}{'images ≠':>10}{'pixels ≠':>10}")
    for name, t in times.items():
        ips = n / statistics.median(t)
        vs_ro = med([a / b for a, b in zip(t, times["robustopt"], strict=True)])
        vs_floor = med([a / b for a, b in zip(t, times["floor"], strict=True)])
        line = f"{name:<17}{ips:>9.0f}{vs_ro:>24}{vs_floor:>20}"
        if name in adv:
            delta = (adv[name] - adv["robustopt"]).abs()
            images, pixels = int((delta.flatten(1).amax(1) > 0).sum()), float((delta > 0).float().mean())
            line += f"{acc[name]:>9.3f}{float(delta.max()):>10.1e}{images:>10}{pixels:>10.2%}"
        print(line)
    print("\n(tool ÷ robustopt time > 1: robustopt is faster; robustopt pgd() also tracks each example's worst iterate,")
    print(" so its adversarial examples may differ from the last iterate's)")


if __name__ == "__main__":
    main()
