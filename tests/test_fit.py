"""robustopt as a library: a user's own nn.Module on a user's own data, through ``fit`` and ``robust_loss``.

The data are synthetic: 5 classes of 3×16×16 images, each class a fixed random mean image plus
Gaussian noise, clipped to [0, 1]. Clean accuracy is easy; robustness at ℓ∞ ε = 0.06 is not,
so a standard net and a robust one differ clearly under PGD.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustopt import ConfigError, DataError, Normalized, ThreatModel, TrainConfig, fit, load_model, robust_loss
from robustopt.rundir import read_metrics
from robustopt.tensors import load_tensors
from robustopt.training.batches import Source
from robustopt.training.distributed import DistInfo
from robustopt.training.metrics import pgd_accuracy
from robustopt.training.objectives import CERTIFIED, METHODS, kl_per_example

THREAT = ThreatModel("linf", 0.06)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) float images in [0, 1] and (n,) labels in 0..4."""
    means = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    return (means[y] + 0.2 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1), y


class SmallNet(nn.Module):
    """A user's own architecture: conv, pool, linear; 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": make_data(1200, 0), "test": make_data(300, 1)}


def _pgd(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    return pgd_accuracy(model, Source(*test), THREAT, 20, torch.device("cpu"), DistInfo(), seed=0)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in CERTIFIED])  # certified: tests/test_training_matrix.py
def test_every_method_trains_a_user_module_on_a_tensor_dataset(method: str, data: dict, tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    model = SmallNet()
    before = [p.detach().clone() for p in model.parameters()]
    steps = 3 if method in ("pgd", "trades", "mart") else None
    summary = fit(
        model, TensorDataset(*data["train"]), test_data=data["test"], out=tmp_path, method=method, threat=THREAT, epochs=1,
        batch_size=50, lr=0.02, steps=steps, log=lambda s: None,
    )  # fmt: skip
    assert summary.epochs == 1 and 0.0 <= summary.test_acc <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    row = read_metrics(tmp_path)[0]
    assert row["train_acc_on"] == ("clean batches" if method == "standard" else "perturbed batches")
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 5
    reloaded = load_model(tmp_path, model=SmallNet())  # a module passed as an object: the caller rebuilds it
    x = data["test"][0][:8]
    torch.testing.assert_close(reloaded(x), model.eval()(x))


@pytest.mark.parametrize(("method", "alpha"), [(m, None) for m in METHODS] + [("pgd", 0.5), ("robust", 0.3)])
def test_every_method_steps_a_batchnorm_net(method: str, alpha: float | None, tmp_path: Path) -> None:
    """Attack passes in train mode must not touch tensors an outer forward saved (BatchNorm's running statistics)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5))
    x, y = make_data(64, 3)
    fit(
        net,
        (x, y),
        THREAT,
        out=tmp_path,
        method=method,
        epochs=1,
        batch_size=32,
        steps=2,
        config=TrainConfig(alpha=alpha),
        log=lambda s: None,
    )
    assert int(net[1].num_batches_tracked) > 0


@pytest.mark.slow
def test_robust_training_beats_standard_training_under_pgd(data: dict, tmp_path: Path, one_thread: None) -> None:
    accs = {}
    for method in ("standard", "pgd", "trades"):
        torch.manual_seed(0)
        model = SmallNet()
        fit(model, data["train"], test_data=data["test"], out=tmp_path / method, method=method, threat=THREAT, epochs=8,
            batch_size=50, lr=0.02, steps=5, log=lambda s: None)  # fmt: skip
        accs[method] = (read_metrics(tmp_path / method)[-1]["test_acc"], _pgd(model, data["test"]))
    assert all(clean > 0.9 for clean, _ in accs.values()), accs  # every net learns the task
    assert accs["pgd"][1] > accs["standard"][1] + 0.1, accs
    assert accs["trades"][1] > accs["standard"][1] + 0.1, accs


def test_robust_loss_in_a_ten_line_loop(data: dict, one_thread: None) -> None:
    """The README's own-loop pattern: only robust_loss and ThreatModel; the inner max leaves no weight gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(768, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for xb, yb in DataLoader(TensorDataset(*data["train"]), batch_size=100, shuffle=True):
        optimizer.zero_grad(set_to_none=True)
        loss = robust_loss(model, xb, yb, THREAT, "pgd", steps=3)
        assert all(p.grad is None for p in model.parameters())  # the inner maximisation formed no weight gradients
        loss.backward()
        optimizer.step()
    assert model.training
    model.eval()
    assert (model(data["test"][0]).argmax(1) == data["test"][1]).float().mean() > 0.8


@pytest.mark.parametrize(("method", "outer_forwards"), [("robust", 1), ("pgd", 1), ("goodfellow", 2), ("trades", 2), ("mart", 2)])
def test_attack_passes_never_move_batchnorm_statistics(method: str, outer_forwards: int) -> None:
    """Only the objective's own forward passes update running statistics, however many attack passes ran."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train()
    x, y = torch.rand(16, 3, 2, 2), torch.randint(0, 3, (16,))
    robust_loss(model, x, y, ThreatModel("linf", 0.1), method, steps=None if method in ("robust", "goodfellow") else 4)
    assert int(model[2].num_batches_tracked) == outer_forwards
    assert model.training


def test_trades_equals_its_definition_on_a_linear_model() -> None:
    """CE(f(x), y) + β·mean KL(p(x) ‖ p(x̃)); x̃: 3 signed-gradient steps on the KL from x + 0.001·N(0, I)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    eps, step, beta = 0.1, 0.04, 2.0
    got = robust_loss(model, x, y, ThreatModel("linf", eps), "trades", beta=beta, steps=3, step_size=step,
                      generator=torch.Generator().manual_seed(5))  # fmt: skip

    g = torch.Generator().manual_seed(5)
    x_adv = torch.min(torch.max(x + 0.001 * torch.randn(x.shape, generator=g), x - eps), x + eps).clamp(0, 1)
    p_clean = F.softmax(model(x), dim=1).detach()
    for _ in range(3):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    want = F.cross_entropy(model(x), y) + beta * F.kl_div(
        F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean"
    )
    torch.testing.assert_close(got, want)


def test_mart_equals_its_definition_on_a_linear_model() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    got = robust_loss(model, x, y, ThreatModel("l2", 0.2), "mart", beta=3.0, steps=1, step_size=1e-9,
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    g = torch.Generator().manual_seed(2)  # a 1e-9 step: x̃ is the Gaussian start, projected
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    adv, clean = model(x_adv), model(x)
    p_adv = F.softmax(adv, 1)
    probs = p_adv.detach().tolist()
    wrong = torch.tensor([max((k for k in range(3) if k != int(t)), key=lambda k: probs[i][k]) for i, t in enumerate(y)])
    bce = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_true = F.softmax(clean, 1).gather(1, y[:, None]).squeeze(1)
    want = bce + 3.0 * (kl_per_example(clean, adv) * (1.0000001 - p_true)).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_kl_per_example_is_zero_for_equal_outputs_and_positive_otherwise() -> None:
    logits = torch.randn(4, 7)
    torch.testing.assert_close(kl_per_example(logits, logits), torch.zeros(4), atol=1e-6, rtol=0)
    assert (kl_per_example(logits, logits.flip(1)) > 0).all()


def test_fit_takes_a_dataloader_flat_features_and_a_user_optimizer_and_scheduler(tmp_path: Path, one_thread: None) -> None:
    """Tabular data (N, D), 7 classes, Adam and a StepLR object; eval_pgd keeps best.safetensors."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(900, 20, generator=g), torch.randn(20, 7, generator=g)
    y = (x @ w).argmax(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 7))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    summary = fit(model, loader, out=tmp_path, method="trades", threat=ThreatModel("l2", 0.1), epochs=3, optimizer=opt,
                  scheduler=sched, eval_pgd=100, log=lambda s: None)  # fmt: skip
    rows = read_metrics(tmp_path)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    assert all(r["pgd_n"] == 100 and 0 <= r["pgd_acc"] <= 1 for r in rows)
    assert summary.best_pgd_acc == max(r["pgd_acc"] for r in rows)
    best = load_model(tmp_path, model=nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 7)), weights="best")
    assert best(x[:3]).shape == (3, 7)


class _Standardised(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, :2]


def test_normalized_wraps_a_model_that_expects_standardised_inputs() -> None:
    model = Normalized(_Standardised(), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x = torch.full((1, 3, 4, 4), 0.75)
    torch.testing.assert_close(model(x), torch.ones(1, 2))
    with pytest.raises(ConfigError):
        Normalized(_Standardised(), mean=[0.5], std=[0.0])


@pytest.mark.parametrize(
    ("train", "kwargs", "error", "text"),
    [
        ("bad_range", {}, DataError, "domain is [0, 1]"),
        ("bad_labels", {}, DataError, "labels in [5,"),
        ("ok", {"optimizer": "foreign"}, ConfigError, "not the model's"),
        ("nan", {}, DataError, "NaN"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    train: str, kwargs: dict, error: type, text: str, tmp_path: Path
) -> None:
    x, y = torch.rand(64, 3, 4, 4), torch.randint(0, 3, (64,))
    sets = {"ok": (x, y), "bad_range": (x * 255, y), "bad_labels": (x, y + 5), "nan": (x.masked_fill(x > 0.99, float("nan")), y)}
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    options = {}
    if kwargs.get("optimizer") == "foreign":
        options["optimizer"] = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(error, match=text.replace("[", r"\[")):
        fit(
            model,
            sets[train],
            out=tmp_path / "run",
            method="pgd",
            threat=ThreatModel("linf", 0.1),
            epochs=1,
            **options,
        )
    assert not (tmp_path / "run").exists()


def test_fit_needs_a_threat_for_adversarial_methods(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a threat"):
        fit(nn.Linear(2, 2), (torch.rand(8, 2), torch.zeros(8, dtype=torch.long)), out=tmp_path, method="pgd")


# ------------------------------------------------------------------------------------------- resume


SCRIPT = """
import sys, torch
from torch import nn
from robustopt import ThreatModel, TrainConfig, fit
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_fit import SmallNet, make_data
torch.manual_seed(0)
fit(SmallNet(), make_data(1200, 0), out=sys.argv[1], method="pgd", threat=ThreatModel("linf", 0.06), epochs=2,
    batch_size=20, steps=2, lr=0.02, eval_pgd=100, config=TrainConfig(checkpoint_minutes=float(sys.argv[2])),
    resume=len(sys.argv) > 3,
    log=lambda s: None)
"""


def _script(tmp: Path) -> Path:
    path = tmp / "user_fit.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return path


@pytest.mark.slow
def test_a_user_model_killed_mid_epoch_resumes_bit_identically(tmp_path: Path) -> None:
    script, env = _script(tmp_path), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.0002"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, meta = load_tensors(killed / "checkpoint.safetensors")
    assert meta["progress"]["epoch"] == 0 and meta["progress"]["batch"] > 0  # killed in the middle of epoch 1
    for args in ([str(killed), "0.0002", "resume"], [str(clean), "100"]):
        done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    a, _ = load_tensors(killed / "model.safetensors")
    b, _ = load_tensors(clean / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(killed)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(clean)]


# --------------------------------------------------------------------------------- factory models


FACTORY = textwrap.dedent(
    """
    from torch import nn

    def build(num_classes=5, width=4):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * width, num_classes))
    """
)


def test_a_factory_model_trained_from_the_cli_is_rebuilt_by_load_model_in_a_fresh_process(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "fitnets.py").write_text(FACTORY)
    x, y = make_data(300, 0)
    arrays = {"x_train": (x[:250] * 255).round().byte().permute(0, 2, 3, 1).numpy(), "y_train": y[:250].numpy()}
    arrays |= {"x_test": (x[250:] * 255).round().byte().permute(0, 2, 3, 1).numpy(), "y_test": y[250:].numpy()}
    np.savez(tmp_path / "mine.npz", **arrays)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    train = [sys.executable, "-m", "robustopt", "train", "--data", "mine.npz", "--model", "fitnets:build", "--model-kwargs",
             '{"width": 6}', "--method", "trades", "--steps", "2", "--eps", "8/255", "--epochs", "1", "--out", "run"]  # fmt: skip
    done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"] == "fitnets:build" and cfg["model_kwargs"] == {"width": 6} and cfg["num_classes"] == 5
    check = "import robustopt; m = robustopt.load_model('run', trust_code=True); print(type(m).__name__, m[0].out_channels)"
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["Sequential", "6"]


def test_tensorboard_without_the_package_is_a_clear_error_before_any_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were not installed
    x, y = make_data(32, 0)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        fit(
            SmallNet(),
            (x, y),
            out=tmp_path / "run",
            method="standard",
            epochs=1,
            config=TrainConfig(tensorboard=True),
            log=lambda s: None,
        )
    assert not (tmp_path / "run").exists()


def test_robust_loss_refuses_inputs_outside_the_threat_bounds() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,))
    with pytest.raises(DataError, match="robust_loss"):
        robust_loss(model, x * 255, y, ThreatModel("linf", 0.1), "pgd")
    with pytest.raises(ConfigError, match="free"):
        robust_loss(model, x, y, ThreatModel("linf", 0.1), "free")


class ModuleAttrNet(SmallNet):
    """A user's net whose trunk happens to be named ``module``, as DDP names what it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.module = self.features
        del self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module(x))


def test_a_net_with_a_submodule_named_module_is_saved_whole_with_its_ema(data: dict, tmp_path: Path, one_thread: None) -> None:
    """Only DDP, DataParallel and torch.compile are unwrapped: an attribute called ``module`` once made the saved
    weights (model, checkpoint, EMA) those of that submodule alone, without the head."""
    torch.manual_seed(0)
    model = ModuleAttrNet()
    x, y = data["train"][0][:200], data["train"][1][:200]
    fit(model, (x, y), out=tmp_path, method="standard", epochs=1, batch_size=50, progress=False,
        config=TrainConfig(ema_decay=0.9), log=lambda s: None)  # fmt: skip
    saved = load_tensors(tmp_path / "model.safetensors")[0]
    assert set(saved) == set(model.state_dict()) and any(k.startswith("head.") for k in saved)
    ckpt = set(load_tensors(tmp_path / "checkpoint.safetensors")[0])
    assert "model.head.weight" in ckpt and any(k.endswith("head.weight") and not k.startswith("model.") for k in ckpt)
    torch.testing.assert_close(load_model(tmp_path, model=ModuleAttrNet()).head.weight, saved["head.weight"])


class _Constant(nn.Module):
    """Logits that ignore the input: always class 0, whatever the weights become."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) * torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.0 * x.flatten(1)[:, :1]


def _four_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g)
    return x, (x[:, :4]).argmax(1)  # learnable: the largest of the first four features


@pytest.mark.parametrize("learns", [False, True])
def test_a_run_stuck_at_chance_is_told_so(tmp_path: Path, one_thread: None, learns: bool) -> None:
    """Clean test accuracy within 2 points of chance for 3 epochs puts one warning line per such epoch in the log."""
    lines: list[str] = []
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)) if learns else _Constant()
    fit(model, _four_classes(800, 0), ThreatModel("linf", 0.01), test_data=_four_classes(400, 1), out=tmp_path, epochs=4,
        lr=0.5, log=lines.append)  # fmt: skip
    warnings = [line for line in lines if line.startswith("warning: clean test accuracy has stayed at chance")]
    if learns:
        assert warnings == [] and read_metrics(tmp_path)[-1]["test_acc"] > 0.6
    else:
        chance = float(_four_classes(400, 1)[1].bincount().max()) / 400  # the majority class's share, not 1/4
        assert len(warnings) == 2 and f"({chance:.3f})" in warnings[0]  # epochs 3 and 4


def test_chance_accuracy_and_not_learning_are_exact() -> None:
    from robustopt.training.monitor import chance_accuracy, not_learning

    assert chance_accuracy(torch.tensor([0, 0, 0, 1]), 2) == 0.75 and chance_accuracy(None, 10) == 0.1
    rows = [{"test_acc": a} for a in (0.11, 0.12, 0.10)]
    assert not_learning(rows, 0.1) is not None
    assert not_learning(rows[1:], 0.1) is None  # fewer than 3 epochs
    assert not_learning([*rows[:2], {"test_acc": 0.1201}], 0.1) is None  # one epoch past chance + 2 points
    assert not_learning([*rows[:2], {"test_acc": None}], 0.1) is None  # no test set: no claim
