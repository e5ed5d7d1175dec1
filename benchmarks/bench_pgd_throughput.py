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
in rotating order; reported is the best (least disturbed) time of each. A peer that is not
importable is skipped with a note. The model is ``--run``'s, or a paper-mnist net trained here
for one epoch by robust optimisation (6k images, ε = 0.2).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from robustopt.data.datasets import load_dataset, to_float
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import perturb
from robustopt.training.config import TrainConfig
from robustopt.training.named import train

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,C,H,W), y (B,)) -> x_adv


def robustopt_attack(model: nn.Module, eps: float, alpha: float, steps: int) -> Attack:
    threat = ThreatModel("linf", eps)
    return lambda x, y: perturb(model, x, y, threat, steps=steps, step_size=alpha)


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
    attacks: dict[str, Attack] = {"robustopt": robustopt_attack(model, args.eps, alpha, args.steps)}
    for name, make in (
        ("torchattacks", lambda: torchattacks_attack(model, args.eps, alpha, args.steps)),
        ("ART", lambda: art_attack(model, args.eps, alpha, args.steps, tuple(x.shape[1:]), len(y))),
    ):
        try:
            attacks[name] = make()
        except ImportError as e:
            print(f"# skipping {name}: not importable ({e})")
    print(f"# {datetime.date.today()}  {platform.machine()}  cpus={os.cpu_count()}  threads={torch.get_num_threads()}  ", end="")
    print(f"torch={torch.__version__}")
    print(f"# paper-mnist, {len(y)} MNIST test images in one batch, PGD linf eps={args.eps} alpha={alpha} steps={args.steps}")
    best = {name: float("inf") for name in attacks}
    adv: dict[str, torch.Tensor] = {}
    names = list(attacks)
    for name in names:  # warm-up, and the adversarial examples compared below
        adv[name] = attacks[name](x, y)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            attacks[name](x, y)
            best[name] = min(best[name], time.perf_counter() - t)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        acc = {n: float((model(a).argmax(1) == y).float().mean()) for n, a in adv.items()}
    print(f"clean accuracy {clean:.3f}\n")
    head = f"{'tool':<14}{'images/s':>10}{'robustopt ÷':>13}{'adv acc':>9}{'max |Δ| to robustopt':>22}"
    print(f"{head}{'images ≠':>10}{'pixels ≠':>10}")
    ref = len(y) / best["robustopt"]
    for n in names:
        ips = len(y) / best[n]
        delta = (adv[n] - adv["robustopt"]).abs()
        images, pixels = int((delta.flatten(1).amax(1) > 0).sum()), float((delta > 0).float().mean())
        print(f"{n:<14}{ips:>10.0f}{ref / ips:>13.2f}{acc[n]:>9.3f}{float(delta.max()):>22.2e}{images:>10}{pixels:>10.2%}")


if __name__ == "__main__":
    main()
