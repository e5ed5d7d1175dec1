"""Attacks: threat-model invariants, exact answers on linear models, ordering on a real MNIST net."""

from __future__ import annotations

import doctest
import inspect
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustopt.errors import ConfigError, DataError, RobustoptError
from robustopt.evaluation.attacks import ATTACKS, attack_options, deepfool, fgsm, lbfgs, pgd, run_attack
from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.attacks.apgd import checkpoints
from robustopt.evaluation.attacks.losses import dlr_loss, margin
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel

BOUNDED = ["fgsm", "fgm", "pgd", "bim", "apgd-ce", "apgd-dlr", "square", "auto", "autoattack", "fab-t"]
MINIMAL = ["deepfool", "cw", "lbfgs"]
FAST = {"pgd": {"steps": 5}, "bim": {"steps": 5}, "apgd-ce": {"steps": 8}, "apgd-dlr": {"steps": 8, "n_targets": 2},
        "square": {"steps": 30}, "auto": {"steps": 5, "n_targets": 2, "queries": 20},
        "autoattack": {"steps": 5, "n_targets": 2, "queries": 20}, "fab-t": {"steps": 5, "n_targets": 2},
        "deepfool": {"steps": 10},
        "cw": {"steps": 10, "search_steps": 2}, "lbfgs": {"steps": 10, "search_steps": 2}}  # fmt: skip


def tiny_net(seed: int = 0) -> nn.Module:
    """(B, 1, 6, 6) -> 5 logits, with BatchNorm and dropout to expose state changes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 5))


@pytest.fixture
def tiny_batch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """12 random (1, 6, 6) inputs; one thread while in use (tiny ops gain nothing from threads and
    suffer badly from them on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    yield torch.rand(12, 1, 6, 6, generator=g), torch.randint(0, 5, (12,), generator=g)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8), ("l1", 3.0)])
@pytest.mark.parametrize("name", BOUNDED)
def test_bounded_attacks_return_points_in_the_threat_model_without_help(name, norm, eps, tiny_batch):
    x, y = tiny_batch
    model, threat = tiny_net().eval(), ThreatModel(norm, eps)
    raw = ATTACKS[name](model, x, y, threat, generator=torch.Generator().manual_seed(0), **FAST.get(name, {}))
    assert raw.shape == x.shape
    assert bool(threat.contains(raw, x, atol=1e-5).all())  # the attack itself, before run_attack projects


@pytest.mark.parametrize("name", MINIMAL)
def test_minimal_attacks_stay_in_the_box_and_run_attack_projects_them(name, tiny_batch):
    x, y = tiny_batch
    model, threat = tiny_net().eval(), ThreatModel("l2", 0.05)
    raw = ATTACKS[name](model, x, y, threat, **FAST[name])
    assert raw.min() >= 0 and raw.max() <= 1
    out = run_attack(model, x, y, threat, name, **FAST[name])
    assert bool(threat.contains(out, x, atol=1e-5).all())


@pytest.mark.parametrize("name", BOUNDED + MINIMAL)
def test_attacks_never_change_modes_or_weights(name, tiny_batch):
    x, y = tiny_batch
    model = tiny_net().train()
    model[2].eval()  # mixed modes: the hardest to restore (BatchNorm in eval mode: subsets may hold one example)
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_attack(model, x, y, ThreatModel("linf", 0.1), name, generator=torch.Generator().manual_seed(0), **FAST.get(name, {}))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "cw", "lbfgs"])
def test_full_batch_attacks_leave_train_mode_batchnorm_statistics_alone(name, tiny_batch):
    x, y = tiny_batch
    model = tiny_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_attack(model, x, y, ThreatModel("l2", 0.5), name, generator=torch.Generator().manual_seed(0), **FAST.get(name, {}))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_margin_sign_and_dlr_invariance(seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    z, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    assert torch.equal(margin(z, y) > 0, z.argmax(1) == y)
    # DLR is invariant to z -> a·z + b (a > 0): a model cannot hide behind logit scale.
    assert torch.allclose(dlr_loss(scale * z + shift, y), dlr_loss(z, y), atol=1e-4)


def test_apgd_checkpoints_follow_the_published_schedule():
    # p: 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (period shrinks by 0.03, never below 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_more_restarts_never_help_the_defender(tiny_batch):
    x, y = tiny_batch
    model, threat = tiny_net().eval(), ThreatModel("linf", 0.05)
    accs = []
    for r in (1, 3):
        x_adv = pgd(model, x, y, threat, steps=5, restarts=r, generator=torch.Generator().manual_seed(3))
        accs.append(float((predict(model, x_adv) == y).float().mean()))
    assert accs[1] <= accs[0]


def linear_model(seed: int = 0, d: int = 16, k: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(d, k).double()
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("norm,dual", [("l2", 2.0), ("linf", 1.0)])
def test_deepfool_on_a_linear_model_finds_the_exact_distance_to_the_boundary(norm, dual):
    model = linear_model()
    lin = model[1]
    x = 0.5 + 0.001 * torch.randn(20, 1, 4, 4, dtype=torch.float64)  # far from the box faces
    with torch.no_grad():
        y = model(x).argmax(1)
    w = lin.weight
    with torch.no_grad():
        z = model(x)
        f = z - z.gather(1, y[:, None])  # (B, K)
        wd = w[None, :, :] - w[y][:, None, :]  # (B, K, D)
        dist = (f.abs() / torch.linalg.vector_norm(wd, ord=dual, dim=2)).scatter(1, y[:, None], math.inf).min(1).values
    x_adv = deepfool(model, x, y, ThreatModel(norm, 100.0), overshoot=0.0)
    found = ThreatModel(norm, 1.0).norm_of(x_adv - x)
    assert bool((predict(model, x_adv) != y).all())
    assert torch.allclose(found, dist, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def std_model(standard_run):
    return load_model(standard_run)


def _acc(model, x_adv, y, clean):
    return float((clean & (predict(model, x_adv) == y)).float().mean())


def test_stronger_attacks_reach_lower_accuracy_on_real_mnist(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:100], mnist_test_batch[1][:100]
    threat, g = ThreatModel("linf", 0.1), torch.Generator().manual_seed(0)
    clean = predict(std_model, x) == y
    a_fgsm = _acc(std_model, run_attack(std_model, x, y, threat, "fgsm"), y, clean)
    a_pgd = _acc(std_model, run_attack(std_model, x, y, threat, "pgd", steps=20, generator=g), y, clean)
    a_auto = _acc(
        std_model, run_attack(std_model, x, y, threat, "auto", steps=20, n_targets=2, queries=50, generator=g), y, clean
    )
    a_clean = float(clean.float().mean())
    assert a_clean > 0.85 and a_fgsm < a_clean and a_pgd <= a_fgsm and a_auto <= a_pgd + 0.01


def test_deepfool_flips_the_label_of_real_mnist_images(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:50], mnist_test_batch[1][:50]
    x_adv = deepfool(std_model, x, y, ThreatModel("l2", 100.0))
    clean = predict(std_model, x) == y
    assert bool((predict(std_model, x_adv) != y).all())
    assert bool(torch.equal(x_adv[~clean], x[~clean]))  # already wrong: unchanged
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def _fgm_minimal_l2(model, x, y, grid):
    """Smallest ε on ``grid`` at which the FGM step x + ε·g/‖g‖ (clipped) flips the label; inf if none."""
    direction = fgsm(model, x, y, ThreatModel("l2", 1.0)) - x  # unit step, then clipped: recompute per ε below
    out = torch.full((len(y),), math.inf)
    for eps in grid:
        x_adv = (x + eps * direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(0, 1)
        hit = (predict(model, x_adv) != y) & torch.isinf(out)
        out[hit] = (x_adv - x).flatten(1).norm(dim=1)[hit]
    return out


def test_lbfgs_finds_smaller_l2_perturbations_than_fgm(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    keep = predict(std_model, x) == y
    x, y = x[keep], y[keep]
    d_fgm = _fgm_minimal_l2(std_model, x, y, torch.linspace(0.1, 12.0, 120))
    x_lb = lbfgs(std_model, x, y, ThreatModel("l2", 100.0), search_steps=5, steps=60)
    d_lb = torch.where(predict(std_model, x_lb) != y, (x_lb - x).flatten(1).norm(dim=1), torch.tensor(math.inf))
    both = torch.isfinite(d_fgm) & torch.isfinite(d_lb)
    assert both.float().mean() >= 0.8 and torch.isfinite(d_lb).sum() >= torch.isfinite(d_fgm).sum()
    assert d_lb[both].median() < d_fgm[both].median()
    assert (d_lb[both] <= d_fgm[both] + 1e-6).float().mean() >= 0.8


@pytest.mark.parametrize("name", BOUNDED + MINIMAL)
def test_every_attack_works_inside_no_grad_and_leaves_no_weight_gradients(name, tiny_batch):
    x, y = tiny_batch
    model, threat = tiny_net().eval(), ThreatModel("linf", 0.1)
    with torch.no_grad():  # as in a validation step
        x_adv = run_attack(model, x, y, threat, name, generator=torch.Generator().manual_seed(0), **FAST.get(name, {}))
        raw = ATTACKS[name](model, x, y, threat, generator=torch.Generator().manual_seed(0), **FAST.get(name, {}))
    assert x_adv.shape == raw.shape == x.shape and bool(threat.contains(x_adv, x).all())
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["pgd", "square", "deepfool"])
def test_inference_mode_is_refused_with_advice(name, tiny_batch):
    x, y = tiny_batch
    model = tiny_net().eval()
    with torch.inference_mode(), pytest.raises(ConfigError, match=r"outside torch.inference_mode\(\).*no_grad\(\) is fine"):
        run_attack(model, x, y, ThreatModel("linf", 0.1), name, **FAST.get(name, {}))
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # tensors made under inference mode, attacked outside it
    assert run_attack(model, xi, yi, ThreatModel("linf", 0.1), "pgd", steps=2).shape == x.shape


def _model_k(k: int = 5) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, k)).eval()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, x, y: run_attack(m, x, y, None), ConfigError, "threat must be a ThreatModel"),
        (lambda m, x, y: run_attack(m, x, y, "linf"), ConfigError, "threat must be a ThreatModel"),
        (lambda m, x, y: run_attack(m, x, y.clamp(max=0) - 1, ThreatModel("linf", 0.1)), DataError, "labels must be >= 0"),
        (lambda m, x, y: run_attack(m, x, y + 5, ThreatModel("linf", 0.1)), DataError, r"labels must be in 0 \.\. 4"),
        (lambda m, x, y: run_attack(m, x, y.float(), ThreatModel("linf", 0.1)), DataError, "integer labels"),
        (lambda m, x, y: run_attack(m, (x * 255).to(torch.uint8), y, ThreatModel("linf", 0.1)), DataError, "dtype"),
        (lambda m, x, y: run_attack(m, x * float("nan"), y, ThreatModel("linf", 0.1)), DataError, "NaN"),
        (lambda m, x, y: run_attack(m, x * 3, y, ThreatModel("linf", 0.1)), DataError, "outside the threat model's bounds"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("l5", 0.1)), ConfigError, "unknown norm"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("linf", -0.1)), ConfigError, "eps must be"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("linf", 0.1), "pgdd"), ConfigError, "unknown attack 'pgdd'"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("linf", 0.1), "pgd", stpes=3), ConfigError, "no option 'stpes'.*steps"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("linf", 0.1), "fgsm", steps=3), ConfigError, "no option 'steps'"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("linf", 0.1), "pgd", steps=0), ConfigError, "steps must be"),
        (lambda m, x, y: run_attack(m, x, y, ThreatModel("linf", 0.1), "square", steps="9"), ConfigError, "steps must be"),
        (lambda m, x, y: run_attack(lambda z: z, x, y, ThreatModel("linf", 0.1)), ConfigError, "torch.nn.Module"),
    ],
)
def test_bad_input_is_one_typed_line(call, error, match, tiny_batch):
    x, y = tiny_batch
    with pytest.raises(error, match=match) as info:
        call(_model_k(), x, y)
    assert isinstance(info.value, RobustoptError) and "\n" not in str(info.value)


def test_attack_options_come_from_the_signature():
    assert attack_options("pgd")["steps"].default == 40 and "restarts" in attack_options("pgd")
    assert attack_options("bim")["random_start"].default is False  # an alias is a partial of pgd
    assert "steps" not in attack_options("fgsm") and attack_options("square")["steps"].default == 5000
    assert attack_options("lbfgs")["steps"].default == 100 and "norm" not in attack_options("deepfool")
    for name, fn in ATTACKS.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:4]] == ["model", "x", "y", "threat"], name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[4:]) and "generator" in attack_options(name), name


def test_a_new_attack_is_one_file(tmp_path, monkeypatch):
    """A module dropped into the package with a module-level ATTACKS dict is discovered, with its options."""
    import robustopt.evaluation.attacks as package
    from robustopt.evaluation.attacks._registry import discover

    src = (
        "def noise(model, x, y, threat, *, steps: int = 1, generator=None):\n"
        "    return threat.random_init(x, generator)\n\n"
        "ATTACKS = {'noise': noise}\n"
    )
    path = Path(package.__file__).parent / "zz_test_noise.py"
    path.write_text(src)
    try:
        found = discover()
        monkeypatch.setitem(ATTACKS, "noise", found["noise"])
        x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 5, (4,))
        out = run_attack(_model_k(), x, y, ThreatModel("l2", 0.3), "noise", steps=2)
        assert bool(ThreatModel("l2", 0.3).contains(out, x).all()) and list(attack_options("noise")) == ["steps", "generator"]
    finally:
        path.unlink()
        sys.modules.pop("robustopt.evaluation.attacks.zz_test_noise", None)


def test_attack_docstrings_run_as_doctests():
    """Every attack's two-line example runs on a tiny model (torchattacks-style docstrings are the manual)."""
    torch.manual_seed(0)
    model = _model_k()
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 5, (4,))
    modules = {sys.modules[getattr(fn, "func", fn).__module__] for fn in ATTACKS.values()}
    import robustopt.evaluation.attacks as package

    for module in sorted(modules | {package}, key=lambda m: m.__name__):
        globs = {**vars(module), "model": model, "x": x, "y": y, "ThreatModel": ThreatModel, "run_attack": run_attack}
        result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        if module is not package:
            assert result.attempted >= 2, module.__name__
