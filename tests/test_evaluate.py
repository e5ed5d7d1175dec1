"""The evaluator's rules, the transfer protocol, resumable runs, gradient-masking checks and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.evaluate import ThreatViolation, evaluate
from robustopt.evaluation.sanity import run_checks
from robustopt.runs import load_model
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


def test_evaluator_rejects_an_attack_that_leaves_the_ball(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]

    def cheat(model, x, y, threat):
        return x + 2 * threat.eps * torch.sign(torch.randn_like(x))

    with pytest.raises(ThreatViolation, match="outside the linf ball"):
        evaluate(std_model, x, y, cheat, ThreatModel("linf", 0.1), sanity=False, progress=False)


def test_evaluator_clips_to_the_box_and_counts_worst_case_per_example(std_model, mnist_test_batch):
    x, y = mnist_test_batch[0][:40], mnist_test_batch[1][:40]
    wrong = (y + 1) % 10

    def out_of_box(model, x, y, threat):  # in the ball but outside [0, 1]: clipping makes it x itself
        return x - threat.eps * (x == 0).float()

    res = evaluate(std_model, x, y, out_of_box, ThreatModel("linf", 0.1), sanity=False, progress=False)
    assert res["adversarial_accuracy"] == res["clean_accuracy"]
    res = evaluate(std_model, x, wrong, "fgsm", ThreatModel("linf", 0.0), sanity=False, progress=False)
    assert res["clean_accuracy"] == res["adversarial_accuracy"] <= 0.1  # wrong labels: never robust
    res = evaluate(std_model, x, y, "fgsm", ThreatModel("linf", 0.1), sanity=False, progress=False)
    clean = predict(std_model, x) == y
    assert not bool((res["robust_mask"] & ~clean).any())
    assert res["adversarial_accuracy"] == pytest.approx(float(res["robust_mask"].float().mean()))


def test_transfer_from_the_model_itself_equals_white_box_and_from_another_differs(std_model, robust_run, mnist_test_batch):
    x, y = mnist_test_batch[0][:60], mnist_test_batch[1][:60]
    threat = ThreatModel("linf", 0.15)
    kw = {"steps": 5, "sanity": False, "progress": False}
    white = evaluate(std_model, x, y, "pgd", threat, **kw)
    self_transfer = evaluate(std_model, x, y, "pgd", threat, source_model=std_model, **kw)
    assert self_transfer["transfer"] and torch.equal(white["robust_mask"], self_transfer["robust_mask"])
    robust_model = load_model(robust_run)
    transfer = evaluate(robust_model, x, y, "fgsm", threat, source_model=std_model, **kw)
    from robustopt.evaluation.attacks import fgsm

    expect = (predict(robust_model, x) == y) & (predict(robust_model, fgsm(std_model, x, y, threat)) == y)
    assert torch.equal(transfer["robust_mask"], expect)


def test_partial_results_are_resumed_not_recomputed(std_model, mnist_test_batch, tmp_path):
    x, y = mnist_test_batch[0][:24], mnist_test_batch[1][:24]
    threat, part = ThreatModel("linf", 0.1), tmp_path / "partial.json"
    kw = {"steps": 3, "batch_size": 8, "sanity": False, "progress": False, "partial_path": part}
    full = evaluate(std_model, x, y, "pgd", threat, **kw)
    saved = json.loads(part.read_text())
    # Pretend the run stopped after one batch, with a marker the evaluator could not recompute.
    saved["clean"], saved["robust"] = [True] * 8, [False] * 8
    part.write_text(json.dumps(saved))
    resumed = evaluate(std_model, x, y, "pgd", threat, **kw)
    assert resumed["robust_mask"][:8].sum() == 0
    assert torch.equal(resumed["robust_mask"][8:], full["robust_mask"][8:])  # same per-batch seeds
    other = evaluate(std_model, x, y, "pgd", threat.with_eps(0.05), **kw)  # other settings: starts afresh
    assert other["n"] == 24 and json.loads(part.read_text())["key"]["eps"] == 0.05


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
