"""Speed at the floor without changing results (issue 19).

* Forward and backward passes are counted by a wrapper module: PGD-k is k input-gradient passes and k + 1
  forwards (the last iterate needs its prediction), APGD-N is N and N + 1, the training inner loops add no
  forward to their own steps, TRADES shares its clean forward.
* The results are bit-identical to references written the straightforward way: a separate forward for every
  iterate's loss, the gradient recomputed at every restart (APGD's is ``benchmarks/bench_apgd_floor.py``'s
  ``reference_apgd_run``, the one copy, which that benchmark also times).
* Weights stay frozen during every attack: no parameter requires grad inside, no ``.grad`` after.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustopt.evaluation.attacks.apgd import apgd, apgd_targeted
from robustopt.evaluation.attacks.autoattack import autoattack
from robustopt.evaluation.attacks.losses import get_loss
from robustopt.evaluation.attacks.pgd import pgd
from robustopt.models.zoo import build_model
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import WorstCase, cross_entropy, perturb
from robustopt.training.adversarial import adversarial_examples, outer_loss
from robustopt.training.objectives import make_objective, objective_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_apgd_floor import reference_apgd_run  # noqa: E402  (the benchmarks folder is not a package)

# the module (robustopt.evaluation.attacks re-exports its function under the same name)
square_mod = importlib.import_module("robustopt.evaluation.attacks.square")

THREATS = [ThreatModel("linf", 0.1), ThreatModel("l2", 1.5), ThreatModel("l1", 8.0)]


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, counts: dict[str, int]) -> torch.Tensor:  # type: ignore[override]
        ctx.counts = counts
        return z.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        ctx.counts["backward"] += 1
        return g, None


class Counting(nn.Module):
    """``net`` with counters: forwards, backwards through it, and forwards that saw a trainable weight."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.counts = {"forward": 0, "backward": 0, "weights_live": 0}

    def reset(self) -> None:
        self.counts.update(forward=0, backward=0, weights_live=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counts["forward"] += 1
        self.counts["weights_live"] += any(p.requires_grad for p in self.net.parameters())
        return _CountBackward.apply(self.net(x), self.counts)


@pytest.fixture(scope="module")
def batch(mnist_test_batch):
    x, y = mnist_test_batch
    return x[:48], y[:48]


@pytest.fixture()
def net() -> Counting:
    torch.manual_seed(0)
    return Counting(build_model("paper-mnist", mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28)).eval())


def _counts(net: Counting) -> tuple[int, int, int]:
    return net.counts["forward"], net.counts["backward"], net.counts["weights_live"]


# ------------------------------------------------------------------------------------------------ pass counts


@pytest.mark.parametrize("steps,restarts", [(1, 1), (10, 1), (5, 3)])
def test_pgd_passes_at_floor(net, batch, steps, restarts):
    x, y = batch
    pgd(net, x, y, THREATS[0], steps=steps, restarts=restarts, generator=torch.Generator().manual_seed(0))
    assert _counts(net) == (restarts * (steps + 1), restarts * steps, 0)


def test_training_inner_loop_passes(net, batch):
    x, y = batch
    perturb(net, x, y, THREATS[0], steps=7, random_start=True, generator=torch.Generator().manual_seed(0))
    assert _counts(net) == (7, 7, 0)  # no tracker: no forward beyond the steps'


@pytest.mark.parametrize("steps", [1, 7, 10, 25])
def test_apgd_passes_at_floor(net, batch, steps):
    x, y = batch
    apgd(net, x, y, THREATS[0], steps=steps, restarts=2, generator=torch.Generator().manual_seed(0))
    assert _counts(net) == (2 * (steps + 1), 2 * steps, 0)


@pytest.mark.parametrize("method", ["pgd", "mart", "trades", "robust"])
def test_objective_passes(net, batch, method):
    """The inner loop's steps plus the outer loss's forwards: 1 (PGD-AT, robust) or 2 (TRADES, MART)."""
    x, y = batch
    net.train()
    obj = make_objective(method, THREATS[0], steps=1 if method == "robust" else 4)
    loss, _ = objective_loss(obj, net, x, y, THREATS[0], generator=torch.Generator().manual_seed(0))
    outer = 2 if method in ("trades", "mart") else 1
    assert net.counts["forward"] == obj.steps + outer
    assert net.counts["weights_live"] == outer
    loss.backward()
    assert net.counts["backward"] == obj.steps + outer


# --------------------------------------------------------------------------------- straightforward references


def _reference_pgd(model, x, y, threat, steps, alpha, starts):
    """PGD written plainly: every iterate's loss and prediction from a forward pass of its own; radius = ε per example."""
    best = WorstCase(x)
    r = threat.radii(x)
    for x_adv in starts:
        for k in range(steps + 1):
            with torch.no_grad():
                logits = model(x_adv)
            best.update(x_adv, cross_entropy(logits, y), logits.argmax(1) != y)
            if k == steps:
                break
            x_req = x_adv.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
            step = alpha * r.view(-1, 1, 1, 1) * threat.ascent_direction(g, iterative=True)
            x_adv = threat.project(x_adv + step, x, r)
    return best.x


@pytest.mark.parametrize("model_name", ["paper-mnist", "small-cnn", "mlp"])
@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
def test_pgd_bit_identical_to_plain_loop(batch, threat, model_name):
    x, y = batch
    torch.manual_seed(0)
    model = build_model(model_name, mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28)).eval()
    g = torch.Generator().manual_seed(3)
    starts = [threat.random_init(x, g, threat.radii(x)), threat.random_init(x, g, threat.radii(x))]
    ref = _reference_pgd(model, x, y, threat, 6, 2.5 / 6, starts)
    got = pgd(model, x, y, threat, steps=6, restarts=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)


def test_linf_perturb_bit_identical_to_sign_and_clamp(net, batch):
    """The training inner loop (no tracker), ℓ∞, against the textbook loop with clamps."""
    x, y = batch
    model, eps, alpha = net.net, 0.1, 0.025
    x_adv = x.clone()
    for _ in range(10):
        x_req = x_adv.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
        x_adv = (x + (x_adv + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    got = perturb(model, x, y, ThreatModel("linf", eps), steps=10, step_size=alpha)
    assert torch.equal(got, x_adv)


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_bit_identical_to_plain_loop(net, batch, threat, loss):
    x, y = batch
    model = net.net
    gen, overall = torch.Generator().manual_seed(1), WorstCase(x)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(2):
            run = reference_apgd_run(model, x, y, threat, 12, get_loss(loss), gen)
            overall.update(run.x, run.loss, run.fooled)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    got = apgd(model, x, y, threat, steps=12, restarts=2, loss=loss, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, overall.x)


@pytest.mark.parametrize("model_name", ["paper-mnist", "mlp"])
def test_trades_shared_clean_forward_is_identical(batch, model_name):
    """TRADES on a stateless model shares the outer clean forward with the attack's target: same loss, same grads."""
    x, y = batch
    threat = ThreatModel("linf", 0.1)
    torch.manual_seed(0)
    model = build_model(model_name, mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28)).train()
    obj = make_objective("trades", threat, steps=3)
    out = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(1)
        if shared:
            loss, logits = objective_loss(obj, model, x, y, threat, generator=g)
        else:
            loss, logits = outer_loss(obj, model, x, adversarial_examples(obj, model, x, y, threat, g), y)
        loss.backward()
        out.append((loss.detach(), logits, [p.grad.clone() for p in model.parameters()]))
    (l0, z0, g0), (l1, z1, g1) = out
    assert torch.equal(l0, l1) and torch.equal(z0, z1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


# ------------------------------------------------------------------------------------------------ frozen weights


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y, t: perturb(m, x, y, t, steps=3),
        lambda m, x, y, t: pgd(m, x, y, t, steps=3, restarts=2),
        lambda m, x, y, t: apgd(m, x, y, t, steps=4),
        lambda m, x, y, t: apgd_targeted(m, x, y, t, steps=3, n_targets=2),
        lambda m, x, y, t: autoattack(m, x, y, t, steps=3, n_targets=2, queries=5),
    ],
    ids=["perturb", "pgd", "apgd", "apgd-t", "autoattack"],
)
def test_no_weight_gradients(net, batch, attack):
    x, y = batch
    attack(net, x, y, THREATS[0])
    assert net.counts["forward"] > 0 and net.counts["weights_live"] == 0
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def _blended_proposal(threat: ThreatModel, x, x_adv, e, p, generator):
    """Square's proposal written the straightforward way: a float window mask, its norm taken row by row, a blend."""
    a, c, h, w = x.shape
    mask = square_mod._windows(a, h, w, square_mod.window_sides(p, h, w), generator, x.device).expand(-1, c, -1, -1).float()
    v = e / threat.norm_of(mask)[:, None, None, None]
    proposal = (x_adv - x) * (1 - mask) + mask * square_mod._signs((a, c, 1, 1), generator, x.device) * v
    return threat.project(x + proposal, x, e.view(-1))


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
@pytest.mark.parametrize("shape", [(6, 3, 12, 12), (6, 1, 7, 9), (6, 20)], ids=["rgb", "non-square", "flat"])
@pytest.mark.parametrize("per_example_radius", [False, True])
def test_square_bit_identical_to_blended_proposal(threat, shape, per_example_radius, monkeypatch):
    """Square's window applied with ``where`` and one norm per query gives the bits of the float-mask blend."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape[1:]), 10))
    x, y = torch.rand(shape), torch.randint(0, 10, (shape[0],))
    radius = torch.rand(shape[0]) * threat.eps if per_example_radius else None

    def run():
        return square_mod.square(net, x, y, threat, steps=150, generator=torch.Generator().manual_seed(1), radius=radius)

    ours = run()
    monkeypatch.setattr(square_mod, "_proposal", _blended_proposal)
    blended = run()
    assert torch.equal(ours, blended)
    assert (ours != x).any()  # proposals were accepted, so the comparison covers the update path
