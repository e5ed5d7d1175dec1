"""The evaluator's rules, the transfer protocol, resumable runs, gradient-masking checks and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robustopt.errors import ConfigError, DataError
from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.evaluate import ThreatViolation, enforce, evaluate
from robustopt.evaluation.sanity import FULL, attack_cost, light_plan, output_checks, run_checks
from robustopt.loading import load_model
from robustopt.threat.model import ThreatModel


class RoundInput(nn.Module):
    """Quantise pixels to 1/255 in front of a net: the forward pass is unchanged for real images,
    the input gradient is exactly zero (torch.round's derivative): textbook gradient masking."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 255) / 255)


@pytest.fixture(scope="module")
def std_model(standard_run):
    return load_model(standard_run)


def test_an_attack_that_leaves_the_ball_is_pulled_back_and_the_evaluator_asserts_the_ball(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]
    threat = ThreatModel("linf", 0.1)

    def cheat(model, x, y, threat):
        return x + 2 * threat.eps * torch.sign(torch.randn_like(x))

    seen = []
    res = evaluate(std_model, x, y, threat, cheat, sanity=False, progress=False)  # run_attack projects at the edge
    assert res.attack == "cheat" and 0.0 <= res.adversarial_accuracy <= res.clean_accuracy
    seen.append(res)
    with pytest.raises(ThreatViolation, match="outside the linf ball"):
        enforce(threat, cheat(std_model, x, y, threat), x, "cheat")  # the evaluator's own check, behind the edge
    half = x.half()
    rounded = threat.project(half.float() + 0.1, half.float()).half()  # a float16 input: rounding is not a violation
    assert enforce(threat, rounded, half, "fp16").dtype == torch.float16


def test_evaluator_clips_to_the_box_and_counts_worst_case_per_example(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:40], mnist_test_batch[1][:40]
    wrong = (y + 1) % 10

    def out_of_box(model, x, y, threat):  # in the ball but outside [0, 1]: clipping makes it x itself
        return x - threat.eps * (x == 0).float()

    res = evaluate(std_model, x, y, ThreatModel("linf", 0.1), out_of_box, sanity=False, progress=False)
    assert res.adversarial_accuracy == res.clean_accuracy
    res = evaluate(std_model, x, wrong, ThreatModel("linf", 0.0), "fgsm", sanity=False, progress=False)
    assert res.clean_accuracy == res.adversarial_accuracy <= 0.1  # wrong labels: never robust
    res = evaluate(std_model, x, y, ThreatModel("linf", 0.1), "fgsm", sanity=False, progress=False)
    clean = predict(std_model, x) == y
    assert not bool((res.robust_mask & ~clean).any())
    assert res.adversarial_accuracy == pytest.approx(float(res.robust_mask.float().mean()))


def test_transfer_from_the_model_itself_equals_white_box_and_from_another_differs(std_model, robust_run, mnist_test_batch):
    x, y = mnist_test_batch[0][:60], mnist_test_batch[1][:60]
    threat = ThreatModel("linf", 0.15)
    kw = {"steps": 5, "sanity": False, "progress": False}
    white = evaluate(std_model, x, y, threat, "pgd", **kw)
    self_transfer = evaluate(std_model, x, y, threat, "pgd", source_model=std_model, **kw)
    assert self_transfer.transfer and torch.equal(white.robust_mask, self_transfer.robust_mask)
    robust_model = load_model(robust_run)
    transfer = evaluate(robust_model, x, y, threat, "fgsm", source_model=std_model, sanity=False, progress=False)
    from robustopt.evaluation.attacks import fgsm

    expect = (predict(robust_model, x) == y) & (predict(robust_model, fgsm(std_model, x, y, threat)) == y)
    assert torch.equal(transfer.robust_mask, expect)


def test_partial_results_are_resumed_not_recomputed(std_model, mnist_test_batch, tmp_path):
    x, y = mnist_test_batch[0][:24], mnist_test_batch[1][:24]
    threat, part = ThreatModel("linf", 0.1), tmp_path / "partial.json"
    kw = {"steps": 3, "batch_size": 8, "sanity": False, "progress": False, "partial_path": part}
    full = evaluate(std_model, x, y, threat, "pgd", **kw)
    saved = json.loads(part.read_text())
    # Pretend the run stopped after one batch, with a marker the evaluator could not recompute.
    saved["clean"], saved["robust"] = [True] * 8, [False] * 8
    part.write_text(json.dumps(saved))
    resumed = evaluate(std_model, x, y, threat, "pgd", **kw)
    assert resumed.robust_mask[:8].sum() == 0
    assert torch.equal(resumed.robust_mask[8:], full.robust_mask[8:])  # same per-batch seeds
    other = evaluate(std_model, x, y, threat.with_eps(0.05), "pgd", **kw)  # other settings: starts afresh
    assert other.n == 24 and json.loads(part.read_text())["key"]["eps"] == 0.05


def test_a_partial_file_of_another_model_or_other_data_is_refused_and_left_untouched(
    std_model, robust_run, mnist_test_batch, tmp_path
):
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    threat, part = ThreatModel("linf", 0.1), tmp_path / "partial.json"
    kw = {"steps": 2, "batch_size": 8, "sanity": False, "progress": False, "partial_path": part}
    evaluate(std_model, x, y, threat, "pgd", **kw)
    before = part.read_bytes()
    with pytest.raises(ConfigError, match="another model or data set"):
        evaluate(load_model(robust_run), x, y, threat, "pgd", **kw)  # B never reads, nor overwrites, A's results
    with pytest.raises(ConfigError, match="another model or data set"):
        evaluate(std_model, x.flip(0), y.flip(0), threat, "pgd", **kw)  # nor other data
    assert part.read_bytes() == before
    key = json.loads(before)["key"]
    assert {"model_sha256", "source_sha256", "data_sha256"} <= set(key) and key["source_sha256"] is None
    kw["options"] = {"loss": "dlr"}  # attack options are part of the key and survive the JSON round trip
    evaluate(std_model, x, y, threat, "pgd", **kw)
    saved = json.loads(part.read_text())
    saved["clean"], saved["robust"] = [False] * 8, [False] * 8
    part.write_text(json.dumps(saved))
    assert evaluate(std_model, x, y, threat, "pgd", **kw).robust_mask[:8].sum() == 0  # resumed from the file


@pytest.mark.parametrize(
    "content",
    [
        {"train": {"epochs": 3}},  # another run's config.json
        "edited",  # a partial whose robust flags exceed its clean flags (an accuracy of 2.0 in a report)
        "too_long",  # more flags than examples
    ],
)
def test_partial_is_refused_when_it_is_not_this_evaluations_results(std_model, mnist_test_batch, tmp_path, content):
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    threat, part = ThreatModel("linf", 0.1), tmp_path / "partial.json"
    kw = {"steps": 2, "batch_size": 8, "sanity": False, "progress": False, "partial_path": part}
    if isinstance(content, dict):
        part.write_text(json.dumps(content))
    else:
        evaluate(std_model, x, y, threat, "pgd", **kw)
        saved = json.loads(part.read_text())
        saved["clean"], saved["robust"] = ([False] * 8, [True] * 8) if content == "edited" else ([True] * 20, [True] * 20)
        part.write_text(json.dumps(saved))
    before = part.read_bytes()
    with pytest.raises(ConfigError, match="--partial"):
        evaluate(std_model, x, y, threat, "pgd", **kw)
    assert part.read_bytes() == before


def test_a_gradient_masked_model_trips_the_sanity_checks_and_square_still_breaks_it(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:60], mnist_test_batch[1][:60]
    masked = RoundInput(std_model).eval()
    threat, g = ThreatModel("linf", 0.2), torch.Generator().manual_seed(0)
    assert torch.equal(predict(masked, x), predict(std_model, x))  # same classifier on real images
    checks = run_checks(masked, x, y, threat, steps=10, queries=300, generator=g)
    failed = {k for k, c in checks.items() if not c["passed"]}
    assert {"large_eps", "whitebox_vs_blackbox", "zero_gradients"} <= failed
    assert checks["whitebox_vs_blackbox"]["blackbox"] < checks["whitebox_vs_blackbox"]["whitebox"] - 0.3
    honest = run_checks(std_model, x, y, threat, steps=10, queries=300, generator=g)
    assert all(c["passed"] for c in honest.values()), honest


class Randomised(nn.Module):
    """Adds fresh noise to the logits on every call: two passes never agree."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z + 0.1 * torch.randn_like(z)


class Softmaxed(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def test_randomised_and_probability_models_trip_their_checks_and_a_plain_model_none(std_model, mnist_test_batch):
    x = mnist_test_batch[0][:16]
    failed = lambda m: {k for k, c in output_checks(m, x).items() if not c["passed"]}  # noqa: E731
    assert failed(std_model) == set()
    assert failed(Randomised(std_model)) == {"randomness"}
    assert failed(Softmaxed(std_model)) == {"logits"}


def test_a_randomised_model_is_attacked_with_eot_and_the_warning_says_what_to_do(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    lines: list[str] = []
    res = evaluate(Randomised(std_model), x, y, ThreatModel("linf", 0.1), "fgsm", sanity=False, progress=False,
                   eot_samples=4, log=lines.append)  # fmt: skip
    assert res.eot and any("randomness" in ln for ln in lines) and any("what to do" in ln for ln in lines)
    plain = evaluate(std_model, x, y, ThreatModel("linf", 0.1), "fgsm", sanity=False, progress=False, log=lines.append)
    assert not plain.eot


def test_light_checks_are_budgeted_at_a_quarter_of_the_attack():
    """What the default checks run, for PGD-20 on 500 and 1000 images and for autoattack; not a wall time."""
    for n in (500, 1000):
        cost = attack_cost("pgd", 20, 1, n)
        plan = light_plan(cost, n, reuse_steps=20)
        assert cost == 20 * n and plan.steps == 0  # the evaluated PGD run is reused, not repeated
        assert plan.more_steps == 40 and plan.cost() <= 0.25 * cost and plan.n >= 16
    stats = {"clean": 950, "apgd-ce": 600, "apgd-t": 550, "fab-t": 548, "square": 545}
    cost = attack_cost("autoattack", None, 1, 1000, stats)
    assert cost == 950 * 100 + 550 * 900 + 548 * 900 + 545 * 5000 / 3
    plan = light_plan(cost, 1000, reuse_steps=None)
    assert plan.cost() <= 0.25 * cost and plan.n == 200
    light = light_plan(attack_cost("pgd", 20, 1, 500), 500, 20)
    assert (FULL.n, FULL.steps, FULL.more_steps, FULL.more_restarts, FULL.queries) == (200, 20, 40, 2, 1000)  # `full`: as before
    assert FULL.cost() > 20 * light.cost()


def test_evaluate_records_its_check_plan_and_per_component_counts(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:24], mnist_test_batch[1][:24]
    res = evaluate(std_model, x, y, ThreatModel("linf", 0.1), "pgd", steps=4, progress=False)
    assert res.sanity_plan["mode"] == "light" and res.sanity_plan["steps"] == 0 and res.sanity_plan["n"] == 16
    assert {"randomness", "logits", "large_eps", "more_steps"} <= set(res.sanity)
    auto = evaluate(std_model, x, y, ThreatModel("linf", 0.1), "auto", steps=3, sanity=False, progress=False,
                    options={"n_targets": 2, "queries": 10})  # fmt: skip
    counts = list(auto.components.values())
    assert counts[0] == round(auto.clean_accuracy * 24) and counts[-1] == round(auto.adversarial_accuracy * 24)


@pytest.mark.parametrize(
    "change,error,needle",
    [
        (lambda x, y: (x * 255, y), DataError, "outside the threat model's bounds"),
        (lambda x, y: (x.masked_fill(x > 0.5, float("nan")), y), DataError, "NaN"),
        (lambda x, y: (x[:0], y[:0]), DataError, "non-empty"),
        (lambda x, y: (x, y[:-1]), DataError, "labels of shape"),
    ],
)
def test_bad_inputs_are_typed_one_line_errors_not_attack_bugs(std_model, mnist_test_batch, change, error, needle):
    from robustopt.threat.perturb import perturb

    x, y = change(mnist_test_batch[0][:8], mnist_test_batch[1][:8])
    calls = [lambda: evaluate(std_model, x, y, ThreatModel("linf", 0.1), "pgd", steps=2, progress=False)]
    if needle != "labels of shape":  # perturb passes y to the loss as it is (TRADES gives it probabilities)
        calls.append(lambda: perturb(std_model, x, y, ThreatModel("linf", 0.1)))
    for call in calls:
        with pytest.raises(error, match=needle) as e:
            call()
        assert "\n" not in str(e.value) and "bug in the attack" not in str(e.value)


@pytest.mark.parametrize("step_size", [float("nan"), -0.1, 0.0, float("inf")])
def test_perturb_and_pgd_refuse_a_bad_step_size(std_model, mnist_test_batch, step_size):
    from robustopt.evaluation.attacks import pgd
    from robustopt.threat.perturb import perturb

    x, y = mnist_test_batch[0][:4], mnist_test_batch[1][:4]
    with pytest.raises(ConfigError, match="step_size must be a finite number > 0"):
        perturb(std_model, x, y, ThreatModel("linf", 0.1), steps=2, step_size=step_size)
    with pytest.raises(ConfigError, match="step_size must be a finite number > 0"):
        pgd(std_model, x, y, ThreatModel("linf", 0.1), steps=2, step_size=step_size)


def test_a_model_with_the_wrong_number_of_classes_or_input_shape_fails_before_any_attack(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]
    five = nn.Sequential(nn.Flatten(), nn.Linear(784, 5))
    attacked = []

    def spy(model, x, y, threat):
        attacked.append(1)
        return x

    with pytest.raises(DataError, match="returns 5 classes but the data has 10"):
        evaluate(five, x, y, ThreatModel("linf", 0.1), spy, progress=False, num_classes=10)
    with pytest.raises(DataError, match="rejected inputs of shape"):
        evaluate(nn.Sequential(nn.Flatten(), nn.Linear(100, 10)), x, y, ThreatModel("linf", 0.1), spy, progress=False)
    assert not attacked


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustopt", *args], capture_output=True, text=True, timeout=600)


def test_cli_evaluate_json_is_one_object_with_the_contract_keys(standard_run):
    p = _cli("evaluate", str(standard_run), "--attack", "fgm", "--norm", "l2", "--eps", "3/2", "--subset", "30", "--json",
             "--no-sanity")  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert {"clean_accuracy", "adversarial_accuracy", "attack", "norm", "eps", "n", "sanity"} - set(res) == {"sanity"}
    assert res["eps"] == 1.5 and res["n"] == 30 and res["adversarial_accuracy"] <= res["clean_accuracy"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--attack", "nope", "--eps", "0.1"], "unknown attack"),
        (["--norm", "l3", "--eps", "0.1"], "unknown norm"),
        (["--eps", "-0.1"], "eps must be"),
        (["--eps", "nan"], "eps must be"),
    ],
)
def test_cli_evaluate_bad_input_is_a_one_line_error(standard_run, args, needle):
    p = _cli("evaluate", str(standard_run), *args)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_evaluate_missing_run_dir(tmp_path: Path):
    p = _cli("evaluate", str(tmp_path / "missing"), "--eps", "0.1")
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def _factory_module(tmp_path: Path, standard_run: Path) -> Path:
    """A user module beside the CLI's working directory: paper-mnist as a factory, plus a 5-class net."""
    cfg = json.loads((standard_run / "config.json").read_text())
    norm = cfg["normalization"]
    (tmp_path / "usernets.py").write_text(
        "from torch import nn\n"
        "from robustopt.models.zoo import build_model\n"
        f"def paper():\n    return build_model('paper-mnist', mean={norm['mean']!r}, std={norm['std']!r}, num_classes=10, "
        "input_shape=(1, 28, 28))\n"
        "def five():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))\n"
    )
    return tmp_path


def _cli_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustopt", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_cli_evaluates_any_model_from_a_factory_and_foreign_weights(standard_run, tmp_path):
    from safetensors.torch import save_file

    cwd = _factory_module(tmp_path, standard_run)
    foreign = tmp_path / "foreign.safetensors"  # written by another tool: no robustopt hash in it
    save_file({k: v.contiguous() for k, v in load_model(standard_run).state_dict().items()}, str(foreign))
    common = ("--attack", "fgsm", "--eps", "0.1", "--subset", "30", "--no-sanity", "--json", "--no-progress")
    p = _cli_in(cwd, "evaluate", "--model", "usernets:paper", "--weights", str(foreign), "--dataset", "mnist", *common)
    assert p.returncode == 0, p.stderr
    ours = _cli("evaluate", str(standard_run), *common)
    a, b = json.loads(p.stdout), json.loads(ours.stdout)
    assert (a["clean_accuracy"], a["adversarial_accuracy"]) == (b["clean_accuracy"], b["adversarial_accuracy"])
    assert a["model"] == "usernets:paper" and a["dataset"] == "mnist"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "usernets:nope", "--weights", "W", "--dataset", "mnist"], "has no attribute"),
        (["--model", "missing_mod:f", "--weights", "W", "--dataset", "mnist"], "cannot import"),
        (["--model", "usernets:paper", "--weights", "W"], "exactly one of --dataset"),
        (["--model", "usernets:five", "--weights", "W", "--dataset", "mnist"], "does not match the model architecture"),
        (["--model", "usernets:five", "--weights", "FIVE", "--dataset", "mnist"], "returns 5 classes but the data has 10"),
        (["RUN", "--queries", "0", "--attack", "autoattack"], "--queries must be >= 1"),
        (["RUN", "--n-targets", "-2", "--attack", "autoattack"], "--n-targets must be >= 1"),
        (["RUN", "--loss", "dlr", "--attack", "square"], "--loss does not apply to --attack square"),
        (["RUN", "--robustbench-json", "rb.json"], "use it with --attack autoattack"),
        (["RUN", "--source", "CIFAR_RUN"], "was trained on 'cifar10'"),
        (["RUN", "--sanity", "some"], "--sanity must be light, full or off"),
        (["RUN", "--start", "10000"], "--start must be between 0 and 9999"),
        (["RUN", "--start", "-1"], "--start must be between 0 and 9999"),
    ],
)
def test_cli_evaluate_bad_models_and_flags_are_one_line_errors_before_any_attack(
    standard_run, tmp_path, monkeypatch, capsys, args, needle
):
    """In-process (the CLI's own main, as the fuzz suite runs it): no interpreter start per case."""
    import shutil

    from safetensors.torch import save_file

    from robustopt import cli

    cwd = _factory_module(tmp_path, standard_run)
    save_file({k: v.contiguous() for k, v in nn.Sequential(nn.Flatten(), nn.Linear(784, 5)).state_dict().items()},
              str(tmp_path / "five.safetensors"))  # fmt: skip
    cifar = tmp_path / "cifar_run"
    shutil.copytree(standard_run, cifar)
    cfg = json.loads((cifar / "config.json").read_text())
    (cifar / "config.json").write_text(json.dumps({**cfg, "dataset": "cifar10"}))
    subst = {"W": str(standard_run / "model.safetensors"), "FIVE": str(tmp_path / "five.safetensors"), "RUN": str(standard_run),
             "CIFAR_RUN": str(cifar)}  # fmt: skip
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", *[subst.get(a, a) for a in args], "--eps", "0.1", "--subset", "10", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_robustbench_json_holds_the_model_card_fields(standard_run, tmp_path):
    out = tmp_path / "card.json"
    p = _cli("evaluate", str(standard_run), "--attack", "autoattack", "--eps", "0.05", "--subset", "12", "--steps", "3",
             "--n-targets", "2", "--queries", "20", "--no-sanity", "--no-progress", "--robustbench-json", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    card = json.loads(out.read_text())
    assert {"clean_acc", "autoattack_acc", "eps", "threat_model", "n_examples", "attack_version"} <= set(card)
    assert card["n_examples"] == 12 and card["threat_model"] == "Linf" and card["eps"] == "0.05"
    assert card["attack_version"] == "custom"  # non-standard budgets are never labelled "standard"
    assert float(card["autoattack_acc"]) <= float(card["clean_acc"])


def _evaluate_json(capsys, *args: str) -> dict:
    """The CLI's own main in-process, its --json object."""
    from robustopt import cli

    try:
        cli.main(["evaluate", *args, "--json", "--no-progress"])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_start_evaluates_a_range_and_the_ranges_add_up_to_the_whole(standard_run, capsys):
    """--start N --subset M attacks test images [N, N+M): the counts of two ranges add up to those of the whole."""
    common = (str(standard_run), "--attack", "fgsm", "--eps", "0.1", "--no-sanity")
    whole = _evaluate_json(capsys, *common, "--subset", "30")
    first = _evaluate_json(capsys, *common, "--subset", "17")
    rest = _evaluate_json(capsys, *common, "--start", "17", "--subset", "13")
    assert (first["start"], rest["start"], rest["n"]) == (0, 17, 13)
    for key in ("clean_accuracy", "adversarial_accuracy"):
        assert round(first[key] * 17 + rest[key] * 13) == round(whole[key] * 30)
    tail = _evaluate_json(capsys, *common, "--start", "9990", "--subset", "50")  # clipped at the end of the test set
    assert tail["n"] == 10


def test_large_eps_check_reaches_every_input_at_l1_on_few_features():
    """ℓ1 at the box's diameter reaches every input, so the check's PGD must search the whole box. An ℓ1 PGD path
    (a few coordinates per step, returning to the saturated ones) left 23-51% of a plain untrained 20-feature net's
    points correct, a false alarm of masking; a net whose input gradient is zero must still fail the check."""
    torch.manual_seed(0)
    x = torch.rand(200, 20)
    y = (x[:, 0] > 0.5).long()
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)).eval()
    threat, plan = ThreatModel("l1", 0.5), light_plan(1e6, 200, None)
    x, y = x[predict(net, x) == y], y[predict(net, x) == y]
    honest = run_checks(net, x, y, threat, plan=plan, generator=torch.Generator().manual_seed(0))
    assert honest["large_eps"]["passed"] and honest["large_eps"]["accuracy"] == 0.0, honest["large_eps"]
    masked = RoundInput(net)  # round(x·255)/255: the same classifier, a zero input gradient
    assert not run_checks(masked, x, y, threat, plan=plan, generator=torch.Generator().manual_seed(0))["large_eps"]["passed"]
