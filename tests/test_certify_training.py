"""Certified training: schedules, the bound losses, fit(method="ibp"/"crown-ibp"/"gaussian") and the certify CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustopt import fit
from robustopt.certify import certify
from robustopt.certify.training import (
    Ramp,
    beta_schedule,
    crown_ibp_loss,
    eps_schedule,
    gaussian_loss,
    ibp_loss,
    kappa_schedule,
    scheduled_loss,
)
from robustopt.errors import ConfigError
from robustopt.models.zoo import Normalized
from robustopt.threat.model import ThreatModel

pytestmark = pytest.mark.usefixtures("one_thread")  # two spinning OpenMP threads on a shared machine are ~10x slower


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))
    return Normalized(net, mean=[0.5], std=[0.5])


def _blobs(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 8x8 images: bright top, bright bottom, dark."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    x[y == 0, :, :4] += 0.7
    x[y == 1, :, 4:] += 0.7
    return x.clamp(0, 1), y


def test_schedules_ramp_eps_and_move_kappa_and_beta_with_it() -> None:
    ramp = Ramp(0.1, 0.5)
    assert [eps_schedule(p, ramp) for p in (0.0, 0.1, 0.3, 0.5, 1.0)] == pytest.approx([0, 0, 0.5, 1, 1])
    assert kappa_schedule(0.0, "ibp") == 1.0 and kappa_schedule(1.0, "ibp") == 0.5
    assert kappa_schedule(0.0, "crown-ibp") == 1.0 and kappa_schedule(1.0, "crown-ibp") == 0.0
    assert beta_schedule(0.0) == 1.0 and beta_schedule(1.0) == 0.0
    ps = [i / 50 for i in range(51)]
    pairs = zip(ps, ps[1:], strict=False)
    assert all(eps_schedule(a) <= eps_schedule(b) and kappa_schedule(a) >= kappa_schedule(b) for a, b in pairs)


def test_bound_loss_upper_bounds_the_clean_loss_and_equals_it_at_zero_eps() -> None:
    model, (x, y) = _net().eval(), _blobs(30)
    threat = ThreatModel("linf", 0.05)
    clean = F.cross_entropy(model(x), y).detach()
    assert float(ibp_loss(model, x, y, threat, kappa=0.0).detach()) >= float(clean)
    assert float(crown_ibp_loss(model, x, y, threat, kappa=0.0, beta=1.0).detach()) >= float(clean)
    assert float(ibp_loss(model, x, y, threat, kappa=0.0, eps_scale=0.0).detach()) == pytest.approx(float(clean), rel=1e-5)
    with pytest.raises(ConfigError, match="kappa"):
        ibp_loss(model, x, y, threat, kappa=1.5)


@pytest.mark.parametrize("wrap", ["compile", "data-parallel"])
def test_bound_losses_of_a_wrapped_model_are_those_of_the_module_it_wraps(wrap: str) -> None:
    """torch.compile and DataParallel wrappers (DDP is tested in test_distributed.py) are traced through, and the
    bound's weight gradients land on the wrapped module's parameters. torch.compile only wraps here: the bound pass
    never calls the compiled forward, so nothing is compiled."""
    model, (x, y) = _net(), _blobs(30)
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    threat = ThreatModel("linf", 0.05)
    plain = crown_ibp_loss(model, x, y, threat, kappa=0.0, beta=0.5)
    (want,) = torch.autograd.grad(plain, [model.model[0].weight])
    through = crown_ibp_loss(wrapped, x, y, threat, kappa=0.0, beta=0.5)
    (got,) = torch.autograd.grad(through, [model.model[0].weight])
    assert float(through.detach()) == float(plain.detach()) and torch.equal(got, want)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bound_losses_are_differentiable_and_training_on_them_lowers_them(beta: float) -> None:
    model, (x, y) = _net(1), _blobs()
    threat = ThreatModel("linf", 0.05)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        loss = crown_ibp_loss(model, x, y, threat, kappa=0.0, beta=beta)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_gaussian_loss_is_seeded_and_scheduled_loss_dispatches() -> None:
    model, (x, y) = _net(), _blobs(12)
    a = gaussian_loss(model, x, y, sigma=0.25, generator=torch.Generator().manual_seed(0))
    b = gaussian_loss(model, x, y, sigma=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    loss, logits = scheduled_loss("ibp", model, x, y, ThreatModel("linf", 0.1), 0.0)  # warm-up: clean loss only
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    with pytest.raises(ConfigError, match="unknown certified training method"):
        scheduled_loss("pgd", model, x, y, ThreatModel("linf", 0.1), 0.5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "gaussian"])
def test_fit_trains_with_certified_methods(tmp_path, method: str) -> None:
    x, y = _blobs(300)
    threat = ThreatModel("linf", 0.1) if method != "gaussian" else ThreatModel("l2", 0.25)
    model = _net(2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    summary = fit(model, (x, y), test_data=(x[:60], y[:60]), out=tmp_path / method, method=method, threat=threat,
                  epochs=3, batch_size=50, optimizer=opt, progress=False)  # fmt: skip
    assert summary.test_acc is not None and summary.test_acc > 0.9
    row = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_acc_on"] == ("noisy batches" if method == "gaussian" else "clean batches")  # what the loss reports
    if method != "gaussian":
        assert certify(model, x[:60], y[:60], threat, "crown").verified_accuracy > 0.5


@pytest.mark.parametrize(
    "method,layer,needle",
    [
        ("crown-ibp", nn.MaxPool2d(2), "MaxPool2d is supported by interval bounds only"),
        ("ibp", nn.Tanh(), r"unsupported layer Sequential.1 \(Tanh\)"),
    ],
)
def test_fit_refuses_a_net_its_certified_method_cannot_bound_before_writing_anything(
    tmp_path, method: str, layer: nn.Module, needle: str
) -> None:
    x, y = _blobs(60)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer, nn.Flatten(), nn.LazyLinear(3))
    net(x[:1])  # materialise the lazy layer
    model = net.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=needle):
        fit(model, (x, y), out=tmp_path / "run", method=method, threat=ThreatModel("linf", 0.1), epochs=1, progress=False)
    assert not (tmp_path / "run").exists() and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _cli(*args: str) -> int:
    from robustopt.cli.app import main

    try:
        main(list(args))
    except SystemExit as e:  # typer exits 0 on success
        return int(e.code or 0)
    return 0


def test_certify_cli_on_a_tiny_run(tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    train = ["train", "--model", "mlp", "--method", "ibp", "--eps", "0.05", "--epochs", "1", "--subset", "600",
             "--test-subset", "100", "--batch-size", "100", "--optimizer", "adam", "--lr", "0.001", "--out", out]  # fmt: skip
    assert _cli(*train) == 0
    capsys.readouterr()
    assert _cli("certify", out, "--eps", "0.01", "--method", "crown", "--subset", "50", "--json") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "crown" and res["n"] == 50 and res["threat"]["eps"] == 0.01
    assert 0.0 <= res["verified_accuracy"] <= res["clean_accuracy"] <= 1.0 and res["seconds"] > 0
    assert _cli("certify", out, "--norm", "l2", "--eps", "0.1", "--method", "smoothing", "--sigma", "0.25", "--n", "200",
                "--subset", "3", "--json") == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["certified_accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert _cli("certify", out, "--eps", "0.1", "--method", "deepz") == 2
    assert "unknown --method 'deepz'" in capsys.readouterr().err
