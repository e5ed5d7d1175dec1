"""Reports of both bounds (issue 20): evaluate --certify, the certified-accuracy curve and plot, reproduce's verified rows."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustopt.certify.plots import certified_curve_plot
from robustopt.data.datasets import to_float
from robustopt.errors import ConfigError
from robustopt.evaluation.report import SoundnessError, bounds, certified_curve
from robustopt.threat.model import ThreatModel

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str) -> int:
    from robustopt.cli.app import main

    try:
        main(list(args))
    except SystemExit as e:  # typer exits 0 on success
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def ibp_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An mlp trained with IBP (ε = 0.05) on 600 MNIST images for one epoch."""
    out = str(tmp_path_factory.mktemp("ibp") / "run")
    train = ["train", "--model", "mlp", "--method", "ibp", "--eps", "0.05", "--epochs", "1", "--subset", "600",
             "--test-subset", "100", "--batch-size", "100", "--optimizer", "adam", "--lr", "0.001", "--out", out]  # fmt: skip
    assert _cli(*train) == 0
    return out


def test_evaluate_certify_json_has_both_bounds_and_the_gap(ibp_run, capsys) -> None:
    capsys.readouterr()
    args = ["evaluate", ibp_run, "--certify", "ibp", "--eps", "0.02", "--subset", "100", "--steps", "10", "--no-sanity"]
    assert _cli(*args, "--no-progress", "--json") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["certify_method"] == "ibp" and res["certify_seconds"] > 0 and res["inconsistent"] == []
    assert 0.0 < res["verified_accuracy"] <= res["adversarial_accuracy"] <= res["clean_accuracy"]
    assert res["gap"] == pytest.approx(res["adversarial_accuracy"] - res["verified_accuracy"])
    assert _cli(*args, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "verified (ibp)" in text and "a guaranteed lower bound" in text and "gap" in text


def test_evaluate_certify_refuses_maxpool_under_crown_and_unknown_methods_before_the_attack(tmp_path, capsys) -> None:
    out = str(tmp_path / "paper")
    assert _cli("train", "--model", "paper-mnist", "--epochs", "1", "--subset", "50", "--test-subset", "20",
                "--batch-size", "50", "--out", out, "--method", "standard") == 0  # fmt: skip
    capsys.readouterr()
    for method, needle in (("crown", "--certify crown cannot bound MaxPool2d"), ("smoothing", "unknown --certify 'smoothing'")):
        code = _cli("evaluate", out, "--certify", method, "--eps", "0.1", "--subset", "10", "--no-progress")
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_bounds_checks_the_layers_before_the_attack_and_flags_a_broken_verified_example(mnist_test_batch, monkeypatch) -> None:
    from dataclasses import replace

    import robustopt.evaluation.report as report

    x, y = mnist_test_batch[0][:20], mnist_test_batch[1][:20]
    calls = []

    def attack(model, x, y, threat, **kw):
        calls.append(1)
        return x

    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Tanh())
    with pytest.raises(ConfigError, match=r"unsupported layer .*Tanh"):
        bounds(tanh, x, y, ThreatModel("linf", 0.1), attack, certify="ibp", sanity=False, progress=False)
    assert not calls
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # a constant classifier: the bound is exact
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(5 * torch.nn.functional.one_hot(y[0], 10).float())
    b = bounds(model, x, y, ThreatModel("linf", 0.3), "pgd", certify="crown", steps=3, sanity=False, progress=False)
    assert b.verified_accuracy == b.attacked_accuracy == int((y == y[0]).sum()) / len(y) and b.gap == 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    real = report.certify_bounds

    def unsound(*args, **kw):  # a certifier bug: every image "verified"
        res = real(*args, **kw)
        return replace(res, verified=torch.ones_like(res.verified), verified_accuracy=1.0)

    monkeypatch.setattr(report, "certify_bounds", unsound)
    with pytest.raises(SoundnessError, match="soundness violation"):
        bounds(model, x, y, ThreatModel("linf", 0.3), "pgd", certify="ibp", steps=3, sanity=False, progress=False)
    flagged = bounds(model, x, y, ThreatModel("linf", 0.3), "pgd", certify="ibp", strict=False, steps=3, sanity=False,
                     progress=False)  # fmt: skip
    assert len(flagged.inconsistent) == 20 - int(flagged.evaluation.robust_mask.sum()) > 0
    assert flagged.to_dict()["inconsistent"] == list(flagged.inconsistent)


def test_certified_curve_and_its_plot(ibp_run, tmp_path, capsys) -> None:
    png = tmp_path / "curve.png"
    capsys.readouterr()
    assert _cli("certify", ibp_run, "--method", "ibp", "--curve", "0,0.01,0.05", "--subset", "50", "--plot", str(png),
                "--json") == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["eps"] == [0.0, 0.01, 0.05] and res["plot"] == str(png) and png.read_bytes()[:8] == PNG
    assert all(v <= a for v, a in zip(res["verified"], res["attacked"], strict=True))
    assert res["verified"][0] == pytest.approx(res["clean"]) and res["verified"] == sorted(res["verified"], reverse=True)
    assert _cli("certify", ibp_run, "--eps", "0.1", "--plot", str(png)) == 2
    assert "--plot goes with --curve" in capsys.readouterr().err
    assert _cli("certify", ibp_run, "--eps", "0.1", "--curve", "0.1") == 2
    assert "either --eps" in capsys.readouterr().err
    only = certified_curve_plot({"linf": {"a": {"eps": [0, 0.1], "verified": [0.9, 0.5]}}}, tmp_path / "x" / "y.png")
    assert only.read_bytes()[:8] == PNG


def test_certified_curve_without_an_attack(mnist_test_batch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = mnist_test_batch[0][:30], mnist_test_batch[1][:30]
    res = certified_curve(model, x, y, "l2", [0.0, 0.5], None)
    assert res["attacked"] == [None, None] and res["method"] == "ibp" and len(res["certify_seconds"]) == 2


def _schedule():
    from robustopt.reproduce.schedule import Schedule

    return Schedule(nets=("baseline", "robust-linf"), radii={"linf": 0.1, "l2": 1.0, "l1": 5.0}, eps_units="pixel", eval_n=60,
                    transfer_scales=(1.0,), attack_steps=3, curve_norms=("linf",), curve_scales=(1.0, 2.0), curve_n=30,
                    curve_steps=2, minimal_norms=("l2",), minimal_n=10, deepfool_steps=3, sanity_n=0, examples=0)  # fmt: skip


def test_reproduce_protocol_adds_ibp_verified_per_norm_and_na_with_a_reason(mnist) -> None:
    from robustopt.models.zoo import MLP
    from robustopt.reproduce.protocol import evaluate_net
    from robustopt.reproduce.report import whitebox_table
    from robustopt.reproduce.seeds import combine_seeds

    s = _schedule()
    x, y = to_float(mnist.x_test[:60]), mnist.y_test[:60]
    torch.manual_seed(0)
    mlp = MLP([0.1307], [0.3081], hidden=32)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Tanh())
    evals = {}
    for name, model in (("baseline", mlp), ("robust-linf", tanh)):
        evals[name], _ = evaluate_net(model, mlp, x, y, s, None, progress=False, own_norm="linf")
    v = evals["baseline"]["verified"]
    assert set(v) == {"linf", "l2", "l1"} and v["linf"]["method"] == "ibp" and v["linf"]["eps"] == pytest.approx(0.1)
    for norm in ("linf", "l2"):
        assert 0.0 <= v[norm]["accuracy"] <= evals["baseline"]["whitebox"][norm]["pgd"] and v[norm]["inconsistent"] == 0
    assert v["l1"]["accuracy"] is None and "vacuous" in v["l1"]["reason"]
    assert len(evals["baseline"]["curves_verified"]["linf"]) == len(evals["baseline"]["curves"]["linf"])
    na = evals["robust-linf"]["verified"]["linf"]
    assert na["accuracy"] is None and "Tanh" in na["reason"] and evals["robust-linf"]["curves_verified"]["linf"] == []
    info = {n: {"seed": 0, "status": "trained", "run_dir": n, "test_acc": 0.5, "train_seconds": 1.0} for n in evals}
    results = {"nets": combine_seeds([(0, info, evals)]), "schedule": {"attack_steps": 3, "attack_restarts": 1}}
    table = whitebox_table(results, ["baseline", "robust-linf"])
    assert "| verified (IBP) ≤ PGD, ℓ∞ ε=0.1 |" in table and "| n/a |" in table
