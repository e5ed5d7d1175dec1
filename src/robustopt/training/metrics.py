"""What a run measures between epochs: clean accuracy, PGD accuracy, the fast-training guard.

Every measurement runs in eval mode through :func:`~robustopt.threat.perturb.preserve_state`
(the mode and BatchNorm statistics are given back as found) and is summed over ranks under DDP,
so every rank takes the same decision.
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import perturb, preserve_state
from robustopt.training import distributed as dist
from robustopt.training.batches import Source, eval_batches


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, info: dist.DistInfo | None = None
) -> float:
    """Clean accuracy of ``model`` on (x, y), sharded over ranks when distributed."""
    return source_accuracy(model, Source(x, y), device, info or dist.DistInfo())


@torch.no_grad()
def source_accuracy(model: nn.Module, source: Source, device: torch.device, info: dist.DistInfo) -> float:
    correct = seen = 0.0
    with preserve_state(model):
        model.eval()
        for xb, yb in eval_batches(source, device, info):
            correct += float((model(xb).argmax(1) == yb).sum())
            seen += len(yb)
    correct, seen = dist.all_sum([correct, seen], device)
    return correct / max(seen, 1.0)


def pgd_accuracy(
    model: nn.Module, source: Source, threat: ThreatModel, steps: int, device: torch.device, info: dist.DistInfo, seed: int
) -> float:
    """PGD-``steps`` accuracy (random start, step 2.5ε/steps) in eval mode, sharded over ranks.

    Its generator is seeded per call (``seed``), never the training stream's, so watching
    robust accuracy does not change the weights a run ends with."""
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = seen = 0.0
    with preserve_state(model):
        model.eval()
        for xb, yb in eval_batches(source, device, info):
            x_adv = perturb(model, xb, yb, threat, steps=steps, random_start=True, generator=gen)
            with torch.no_grad():
                correct += float((model(x_adv).argmax(1) == yb).sum())
            seen += len(yb)
    correct, seen = dist.all_sum([correct, seen], device)
    return correct / max(seen, 1.0)


def guard_accuracy(model: nn.Module, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
    """PGD-10 accuracy on held-out training examples: Wong et al.'s catastrophic-overfitting check.

    x (N, ...) floats on the model's device, y (N,). The mean over ranks: random starts differ per
    rank, and all ranks must take the same decision."""
    with preserve_state(model):
        model.eval()
        x_adv = perturb(model, x, y, threat, steps=10, random_start=True, generator=generator)
        with torch.no_grad():
            acc = float((model(x_adv).argmax(1) == y).float().mean())
    total, ranks = dist.all_sum([acc, 1.0], x.device)
    return total / ranks
