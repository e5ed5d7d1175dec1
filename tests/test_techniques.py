"""The training techniques of issue 18 do exactly what they say, on tiny CPU models.

EMA = an average computed by hand; AWP's perturbation has norm γ‖w_l‖ per layer and the step lands on
w + Δ(w + v); the ε ramp follows its schedule; label smoothing = ``F.cross_entropy(label_smoothing=s)``;
extra data fills each batch at its ratio; a run with all of them on, interrupted mid-ramp, resumes bit-identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustopt import ConfigError, ThreatModel, TrainConfig, fit, robust_loss
from robustopt.tensors import load_tensors
from robustopt.threat.perturb import perturb
from robustopt.training import awp, loop
from robustopt.training.batches import Source
from robustopt.training.distributed import DistInfo
from robustopt.training.ema import WeightAverage
from robustopt.training.extra import extra_batches
from robustopt.training.objectives import StepContext, make_objective, objective_loss
from robustopt.training.schedules import eps_factor, ramped

THREAT = ThreatModel("linf", 0.1)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 6, 6) images in [0, 1], 3 classes (a class mean plus noise)."""
    means = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(9)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return (means[y] + 0.15 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1), y


def small_net(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3), *([nn.BatchNorm2d(4)] if bn else []), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ EMA


def test_ema_equals_an_average_computed_by_hand() -> None:
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightAverage(model, decay=0.8, warmup=True)
    hand = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    x, y = make_data(16, 1)
    for t in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(model)
        d = min(0.8, (1 + t) / (10 + t))
        assert ema.decay_at(t) == d
        for k, v in model.state_dict().items():
            hand[k] = d * hand[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    assert ema.decay_at(100) == 0.8 and WeightAverage(model, 0.8, warmup=False).decay_at(0) == 0.8
    got = ema.module.state_dict()
    for k, v in hand.items():  # parameters and BatchNorm running statistics averaged, num_batches_tracked copied
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7, msg=k)
    assert int(got["1.num_batches_tracked"]) == 5 and not ema.module.training
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])


# ------------------------------------------------------------------------------------------------ AWP


def test_awp_perturbation_has_relative_norm_gamma_and_the_step_is_taken_at_w_plus_v(monkeypatch: pytest.MonkeyPatch) -> None:
    gamma, lr = 0.05, 0.1
    model = small_net(bn=False)
    x, y = make_data(12, 2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    # by hand: x̃ (robust: one deterministic step), v_l = γ‖w_l‖ g_l/‖g_l‖ on weights of dim > 1, the gradient at w + v
    x_adv = perturb(model, x, y, THREAT, steps=1, step_size=0.1, random_start=False)
    names = [k for k, p in model.named_parameters() if p.dim() > 1]
    probe = small_net(bn=False)
    probe.load_state_dict(model.state_dict())
    g = torch.autograd.grad(F.cross_entropy(probe(x_adv), y), [dict(probe.named_parameters())[k] for k in names])
    v = {k: gamma * before[k].norm() * gk / gk.norm() for k, gk in zip(names, g, strict=True)}
    with torch.no_grad():
        for k in names:
            dict(probe.named_parameters())[k].add_(v[k])
    grads = dict(zip(dict(probe.named_parameters()), torch.autograd.grad(F.cross_entropy(probe(x_adv), y),
                                                                         list(probe.parameters())), strict=True))  # fmt: skip
    seen: list[list[torch.Tensor]] = []
    original = awp.weight_perturbation
    monkeypatch.setattr(awp, "weight_perturbation", lambda w, gr, gm: seen.append(original(w, gr, gm)) or seen[-1])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ctx = StepContext(model, model, opt, THREAT, make_objective("robust", THREAT, step_size=0.1), torch.Generator())
    awp.awp_step(ctx, x, y, gamma)
    for vl, k in zip(seen[0], names, strict=True):  # the stated relative norm, per layer
        assert float(vl.norm() / before[k].norm()) == pytest.approx(gamma, rel=1e-5)
        torch.testing.assert_close(vl, v[k], rtol=1e-4, atol=1e-7)
    for k, p in model.named_parameters():  # removed again: w + Δ(w + v), Δ = −lr·∇L(w + v)
        torch.testing.assert_close(p.detach(), before[k] - lr * grads[k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------- ε ramp


def test_ramp_follows_its_schedule_for_eps_and_step_size() -> None:
    cfg = TrainConfig(model="custom", method="pgd", epochs=10, eps_ramp_epochs=4)
    for progress, want in ((0.0, 0.0), (0.05, 0.125), (0.1, 0.25), (0.3, 0.75), (0.4, 1.0), (0.9, 1.0)):
        assert eps_factor(cfg, progress) == pytest.approx(want)
    assert eps_factor(TrainConfig(model="custom"), 0.0) == 1.0  # off by default
    model = small_net()
    ctx = StepContext(model, model, torch.optim.SGD(model.parameters(), lr=0.1), ThreatModel("linf", 0.3),
                      make_objective("pgd", ThreatModel("linf", 0.3), steps=4), torch.Generator())  # fmt: skip
    half = ramped(ctx, 0.5)
    assert half.threat.eps == pytest.approx(0.15) and half.objective.step_size == pytest.approx(0.5 * 2.5 * 0.3 / 4)
    assert ctx.threat.eps == 0.3 and ramped(ctx, 1.0) is ctx and half.state is ctx.state


def test_fit_trains_each_batch_at_the_ramped_eps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, float, float]] = []
    step = loop.train_step

    def spy(ctx: StepContext, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
        seen.append((ctx.progress, ctx.threat.eps, ctx.objective.step_size))
        return step(ctx, x, y)

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = TrainConfig(eps_ramp_epochs=1.5, step_size=0.02)
    fit(small_net(), make_data(80, 0), THREAT, out=tmp_path / "r", method="pgd", steps=2, epochs=2, batch_size=20,
        config=cfg, log=lambda s: None)  # fmt: skip
    assert len(seen) == 8
    for progress, eps, step_size in seen:
        r = min(1.0, progress * 2 / 1.5)
        assert eps == pytest.approx(0.1 * r) and step_size == pytest.approx(0.02 * r if r > 0 else 0.02)
    assert [round(p, 3) for p, _, _ in seen[:3]] == [0.0, 0.125, 0.25] and seen[-1][1] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ smoothing


@pytest.mark.parametrize("method", ["standard", "pgd", "goodfellow", "trades"])
def test_label_smoothing_equals_torch_cross_entropy(method: str) -> None:
    model, (x, y), s = small_net().eval(), make_data(10, 3), 0.2
    obj = make_objective(method, THREAT, steps=1 if method == "goodfellow" else 2, label_smoothing=s)
    loss, _ = objective_loss(obj, model, x, y, THREAT, generator=torch.Generator().manual_seed(4))
    plain, _ = objective_loss(make_objective(method, THREAT, steps=obj.steps), model, x, y, THREAT,
                              generator=torch.Generator().manual_seed(4))  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    if method == "standard":
        want = F.cross_entropy(model(x), y, label_smoothing=s)
    elif method == "pgd":
        x_adv = perturb(model, x, y, THREAT, steps=2, step_size=obj.step_size, random_start=True, generator=gen)
        want = F.cross_entropy(model(x_adv), y, label_smoothing=s)
    elif method == "goodfellow":
        x_adv = perturb(model, x, y, THREAT, steps=1, step_size=obj.step_size, random_start=False)
        want = 0.5 * F.cross_entropy(model(x), y, label_smoothing=s) + 0.5 * F.cross_entropy(model(x_adv), y, label_smoothing=s)
    else:  # the smoothed CE replaces the clean CE; the KL term is unchanged
        want = plain - F.cross_entropy(model(x), y) + F.cross_entropy(model(x), y, label_smoothing=s)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert float(loss.detach()) != pytest.approx(float(plain.detach()))
    torch.testing.assert_close(robust_loss(model, x, y, THREAT, "standard", label_smoothing=s),
                               F.cross_entropy(model(x), y, label_smoothing=s))  # fmt: skip


# ----------------------------------------------------------------------------------------- extra data


def write_extra(path: Path, n: int, label: int = 2) -> Path:
    """Extra images that are all ones (the training images never are), labelled ``label``."""
    np.savez(path, x=np.full((n, 6, 6), 255, dtype=np.uint8), y=np.full(n, label, dtype=np.int64))
    return path


def test_extra_data_fills_each_batch_at_its_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda ctx, x, y: batches.append((x, y)) or step(ctx, x, y))
    cfg = TrainConfig(extra_data=str(write_extra(tmp_path / "extra.npz", 30)), extra_ratio=0.25)
    fit(small_net(), make_data(60, 0), THREAT, out=tmp_path / "r", method="pgd", steps=1, epochs=1, batch_size=20,
        config=cfg, log=lambda s: None)  # fmt: skip
    assert len(batches) == 4  # 60 training examples, 15 a batch
    for x, y in batches:
        extra = (x.flatten(1) == 1.0).all(1)
        assert len(y) == 20 and int(extra.sum()) == 5 and bool(extra[-5:].all()) and bool((y[-5:] == 2).all())
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["train"]["extra_data_fingerprint"]


def test_extra_batches_are_a_pure_function_of_seed_epoch_and_position() -> None:
    src = Source(torch.arange(7, dtype=torch.float32)[:, None], torch.zeros(7, dtype=torch.long))
    one = extra_batches(src, 3, seed=1, epoch=2, info=DistInfo(), device=torch.device("cpu"))
    first = [next(one)[0].flatten().tolist() for _ in range(5)]
    later = extra_batches(src, 3, seed=1, epoch=2, info=DistInfo(), device=torch.device("cpu"), start=3)
    assert next(later)[0].flatten().tolist() == first[3]
    assert sorted(sum(first[:2], []) + first[2][:1]) == list(range(7))  # each extra example once before any repeats


def test_extra_data_is_checked_against_the_training_data(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 5, 5), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(Exception, match="shape"):
        fit(small_net(), make_data(40, 0), THREAT, out=tmp_path / "r", config=TrainConfig(extra_data=str(bad)))
    with pytest.raises(Exception, match="labels"):
        cfg = TrainConfig(extra_data=str(write_extra(tmp_path / "e.npz", 4, label=7)))
        fit(small_net(), make_data(40, 0), THREAT, out=tmp_path / "r2", config=cfg)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"ema_decay": 1.0}, "ema-decay"), ({"ema_decay": -0.1}, "ema-decay"), ({"awp_gamma": 0}, "awp-gamma"),
     ({"label_smoothing": 1.0}, "label-smoothing"), ({"extra_ratio": 1.0}, "extra-ratio"),
     ({"eps_ramp_epochs": 20}, "eps-ramp-epochs"), ({"method": "ibp", "eps_ramp_epochs": 1}, "own schedule"),
     ({"method": "free", "awp_gamma": 0.01}, "awp-gamma"), ({"extra_data": "x.npz", "batch_size": 1}, "batch-size")],
)  # fmt: skip
def test_bad_technique_options_are_one_line_config_errors(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig(**changes)
    assert "\n" not in str(info.value)


def test_the_techniques_are_training_keys() -> None:
    keys = TrainConfig().training_keys()
    for k in ("ema_decay", "ema_warmup", "eps_ramp_epochs", "awp_gamma", "label_smoothing", "extra_data", "extra_ratio"):
        assert k in keys


# ------------------------------------------------------------------------------------ exact resume


ONE_BATCH = loop._one_batch


class Stopped(Exception):
    """The interruption of a run (as a crash or Ctrl-C would)."""


def _run(out: Path, extra: Path, *, stop_at: int | None, monkeypatch: pytest.MonkeyPatch, resume: bool = False) -> None:
    """EMA, ε ramp (1.5 of 2 epochs), AWP, label smoothing and extra data all on; optionally stopped before batch
    ``stop_at`` (counted over the run, with a checkpoint after every batch)."""
    calls = [0]
    one = ONE_BATCH  # not loop._one_batch: an earlier _run of the same test may have replaced it

    def stopping(run, x, y, iters):  # noqa: ANN001, ANN202
        if stop_at is not None and calls[0] == stop_at:
            raise Stopped
        calls[0] += 1
        return one(run, x, y, iters)

    monkeypatch.setattr(loop, "_one_batch", stopping)
    cfg = TrainConfig(ema_decay=0.9, eps_ramp_epochs=1.5, awp_gamma=0.02, label_smoothing=0.1, extra_data=str(extra),
                      extra_ratio=0.25, checkpoint_minutes=1e-9 if stop_at is not None else 10.0)  # fmt: skip
    fit(small_net(), make_data(100, 0), THREAT, out=out, method="pgd", steps=2, epochs=2, batch_size=20, eval_pgd=20,
        test_data=make_data(30, 1), config=cfg, resume=resume, log=lambda s: None)  # fmt: skip


def test_resume_mid_ramp_with_every_technique_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = write_extra(tmp_path / "extra.npz", 16)
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    _run(ref, extra, stop_at=None, monkeypatch=monkeypatch)
    with pytest.raises(Stopped):
        _run(victim, extra, stop_at=7, monkeypatch=monkeypatch)  # epoch 2, batch 2 of 6: still inside the ramp
    _, meta = load_tensors(victim / "checkpoint.safetensors")
    assert (meta["progress"]["epoch"], meta["progress"]["batch"]) == (1, 1)
    _run(victim, extra, stop_at=None, monkeypatch=monkeypatch, resume=True)
    for name in ("model.safetensors", "best.safetensors", "checkpoint.safetensors"):
        a, _ = load_tensors(ref / name)
        b, _ = load_tensors(victim / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng.")), name
    ckpt, _ = load_tensors(ref / "checkpoint.safetensors")
    record, _ = load_tensors(ref / "model.safetensors")
    assert all(torch.equal(record[k], ckpt[f"method.ema.{k}"]) for k in record)  # the EMA is the model of record ...
    assert not torch.equal(record["0.weight"], ckpt["model.0.weight"])  # ... and the raw weights are kept beside it
    rows = [[{k: v for k, v in json.loads(s).items() if k != "seconds"} for s in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (ref, victim)]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2
