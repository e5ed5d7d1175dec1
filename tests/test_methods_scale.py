"""Behaviour of the cheaper methods and of mixed precision.

* ``free`` (Shafahi et al. 2019): each replay is one optimiser step, and its backward pass also
  gives ∇ₓ, used for δ ← Π(δ + α·d(∇ₓ)); δ persists across replays and minibatches.
* ``fast`` (Wong et al. 2020): after each epoch a PGD check of 500 held-out training images
  guards against catastrophic overfitting: a drop of more than ``guard_drop`` below the best
  restores the best weights and stops.
* ``--amp bf16`` autocasts to bfloat16, which CPUs support.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustopt.data.datasets import Dataset, to_float
from robustopt.files import read_json
from robustopt.loading import load_model
from robustopt.models.zoo import build_model
from robustopt.rundir import read_metrics
from robustopt.threat.model import ThreatModel
from robustopt.training.config import TrainConfig
from robustopt.training.metrics import accuracy, guard_accuracy
from robustopt.training.named import train
from robustopt.training.objectives import StepContext, train_step
from robustopt.training.setup import context_for

train_module = importlib.import_module("robustopt.training.loop")
named_module = importlib.import_module("robustopt.training.named")  # the package re-exports the function `train`


def _mnist_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("paper-mnist", mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28))


def _free_context(model: nn.Module, norm: str, eps: float, replays: int, lr: float) -> StepContext:
    cfg = TrainConfig(method="free", norm=norm, eps=eps, replays=replays)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # lr 0 keeps θ fixed: ∇ₓ is then recomputable
    return context_for(cfg, model, model, opt, ThreatModel(norm, eps), torch.Generator().manual_seed(0))


def _record_inputs(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.5)])
def test_free_delta_follows_the_ascent_recurrence_across_replays_and_batches(norm: str, eps: float, mnist: Dataset) -> None:
    """With θ fixed, replay k+1 trains on Π(x̃_k + ε·d(∇ₓJ(x̃_k))), and batch 2 starts from batch 1's δ."""
    model, threat, m = _mnist_model(), ThreatModel(norm, eps), 3
    ctx = _free_context(model, norm, eps, replays=m, lr=0.0)
    seen = _record_inputs(model)
    x1, y1 = to_float(mnist.x_train[:32]), mnist.y_train[:32]
    x2, y2 = to_float(mnist.x_train[32:64]), mnist.y_train[32:64]
    train_step(ctx, x1, y1)
    delta1 = ctx.state["free_delta"]
    train_step(ctx, x2, y2)
    assert len(seen) == 2 * m
    assert torch.equal(seen[0], x1)  # δ starts at 0
    for x, y, inputs in ((x1, y1, seen[:m]), (x2, y2, seen[m:])):
        for before, after in zip(inputs, inputs[1:], strict=False):
            xb = before.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xb), y), xb)
            expected = threat.project(before + eps * threat.ascent_direction(g, iterative=True), x)
            torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
        assert threat.contains(torch.stack(inputs).flatten(0, 1), x.repeat(m, 1, 1, 1), atol=1e-6).all()
    torch.testing.assert_close(seen[m], threat.project(x2 + delta1, x2), rtol=0, atol=0)  # carried over
    assert float(threat.norm_of(delta1).max()) > 0.5 * eps  # δ really moved
    final = ctx.state["free_delta"]
    assert threat.contains(x2 + final, x2, atol=1e-6).all()


def test_free_takes_one_optimiser_step_per_replay(mnist: Dataset) -> None:
    model = _mnist_model()
    ctx = _free_context(model, "linf", 0.1, replays=4, lr=0.01)
    steps: list[int] = []
    ctx.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(3):
        train_step(ctx, to_float(mnist.x_train[32 * i : 32 * (i + 1)]), mnist.y_train[32 * i : 32 * (i + 1)])
    assert len(steps) == 3 * 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _fast_run(tmp: Path, monkeypatch: pytest.MonkeyPatch, guard_accs: list[float], epochs: int) -> tuple[dict, list[dict]]:
    """Train ``fast`` with the guard's PGD accuracies scripted; returns (summary, weights seen by each guard call)."""
    snapshots: list[dict] = []

    def scripted_guard(model, threat, x, y, generator):
        assert len(y) == 500  # the held-out images
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return guard_accs[len(snapshots) - 1]

    monkeypatch.setattr(train_module, "guard_accuracy", scripted_guard)
    cfg = TrainConfig(method="fast", model="mlp", eps=0.1, lr=0.05, batch_size=100, subset=1500, epochs=epochs, guard_drop=0.2)
    summary = train(cfg, tmp, device="cpu", progress=False, log=lambda s: None)
    return summary, snapshots


def test_fast_guard_restores_the_best_weights_and_stops_on_collapse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist: Dataset
) -> None:
    summary, snapshots = _fast_run(tmp_path, monkeypatch, [0.5, 0.8, 0.55, 0.9], epochs=4)
    assert summary.stopped_early_at == 3 and summary.epochs == 3 and len(snapshots) == 3
    model = load_model(tmp_path)
    for k, v in model.state_dict().items():  # the saved model is epoch 2's (best guard), not epoch 3's
        assert torch.equal(v, snapshots[1][k]), k
    assert any(not torch.equal(v, snapshots[2][k]) for k, v in model.state_dict().items())
    rows = read_metrics(tmp_path)
    assert [r["guard_pgd_acc"] for r in rows] == [0.5, 0.8, 0.55]
    assert rows[-1]["test_acc"] == pytest.approx(accuracy(model, mnist.x_test, mnist.y_test, torch.device("cpu")))
    assert read_json(tmp_path / "summary.json")["stopped_early_at"] == 3


def test_fast_guard_tolerates_a_drop_smaller_than_guard_drop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary, snapshots = _fast_run(tmp_path, monkeypatch, [0.8, 0.65], epochs=2)
    assert summary.stopped_early_at is None and len(snapshots) == 2
    model = load_model(tmp_path)
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())  # last, not best, weights


def test_real_guard_check_is_the_pgd_accuracy_of_the_held_out_images(mnist: Dataset) -> None:
    """The real guard: PGD-10 accuracy on the held-out images, equal to clean accuracy as ε → 0, lower at ε = 0.3."""
    torch.manual_seed(0)
    model = build_model("mlp", mean=[0.1307], std=[0.3081], num_classes=10, input_shape=(1, 28, 28))
    held = (mnist.x_train[-500:], mnist.y_train[-500:])
    dev = torch.device("cpu")
    clean = accuracy(model, held[0], held[1], dev)
    x, y = held[0].float() / 255, held[1]
    gen = torch.Generator().manual_seed(0)
    tiny = guard_accuracy(model, ThreatModel("linf", 1e-6), x, y, gen)
    large = guard_accuracy(model, ThreatModel("linf", 0.3), x, y, gen)
    assert tiny == pytest.approx(clean, abs=1 / 500) and clean > 0.02
    assert 0.0 <= large < clean
    assert model.training  # mode restored


def test_bf16_autocast_trains_an_epoch_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--amp bf16: the convolutions really run in bfloat16 during training, and the epoch still learns."""
    dtypes: set[torch.dtype] = set()
    real_build = named_module.build

    def build_with_probe(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.features[3].register_forward_hook(lambda m, i, out: dtypes.add(out.dtype) if m.training else None)
        return model

    monkeypatch.setattr(named_module, "build", build_with_probe)
    cfg = TrainConfig(method="robust", eps=0.1, lr=0.05, batch_size=50, subset=2000, epochs=1, amp="bf16")
    summary = train(cfg, tmp_path, device="cpu", progress=False, log=lambda s: None)
    assert dtypes == {torch.bfloat16}
    assert summary.test_acc > 0.5  # chance is 0.1; fp32 reaches about 0.75 here
    assert load_model(tmp_path).features[3].weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize(("norm", "eps", "alpha"), [("linf", 0.1, 0.5), ("l2", 1.5, 0.3), ("l1", 2.0, 0.5)])
def test_goodfellow_one_forward_step_equals_the_two_pass_definition(norm: str, eps: float, alpha: float, mnist: Dataset) -> None:
    """The one-forward Goodfellow step updates θ exactly as α·J(x) + (1−α)·J(perturb(x)) with a separate attack pass."""
    from robustopt.threat.perturb import perturb

    x, y = to_float(mnist.x_train[:48]), mnist.y_train[:48]
    fast_model, ref_model = _mnist_model(), _mnist_model()
    cfg = TrainConfig(method="goodfellow", norm=norm, eps=eps, alpha=alpha)
    opt = torch.optim.SGD(fast_model.parameters(), lr=0.1, momentum=0.9)
    ctx = context_for(cfg, fast_model, fast_model, opt, ThreatModel(norm, eps), torch.Generator().manual_seed(0))
    loss, _ = train_step(ctx, x, y)

    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    x_adv = perturb(ref_model, x, y, ThreatModel(norm, eps))
    ref_loss = alpha * F.cross_entropy(ref_model(x), y) + (1 - alpha) * F.cross_entropy(ref_model(x_adv), y)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for (name, p), q in zip(fast_model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
