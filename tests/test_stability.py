"""Minimal-perturbation measures: exact on linear models, summaries, curves, histograms, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from robustopt.evaluation.stability import accuracy_curve, minimal_perturbations, plot_histogram, summary
from robustopt.threat.model import ThreatModel


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dual: float) -> torch.Tensor:
    """Distance to the nearest pairwise decision hyperplane of an affine classifier (no box)."""
    w = model[1].weight
    with torch.no_grad():
        z = model(x)
        f = z.gather(1, y[:, None]) - z
        wd = torch.linalg.vector_norm(w[None] - w[y][:, None], ord=dual, dim=2)
        return (f / wd).scatter(1, y[:, None], math.inf).min(1).values


@pytest.fixture
def linear_case():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _linear().eval()
    x = 0.5 + 0.002 * torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    yield model, x, y
    torch.set_num_threads(threads)


@pytest.mark.parametrize("norm,dual", [("l2", 2.0), ("linf", 1.0)])
def test_pgd_binary_search_brackets_the_exact_minimal_distance(linear_case, norm, dual):
    model, x, y = linear_case
    exact = _exact(model, x, y, dual)
    found = minimal_perturbations(model, x, y, ThreatModel(norm, 0.0), method="pgd", steps=20, search_steps=14)
    assert bool((found >= exact * (1 - 1e-4)).all())  # nothing beats the exact minimum
    assert bool((found <= exact * 1.05 + 1e-4).all())  # and the search gets close to it


def test_deepfool_method_marks_misclassified_as_zero(linear_case):
    model, x, y = linear_case
    wrong = y.clone()
    wrong[:4] = (y[:4] + 1) % 3
    d = minimal_perturbations(model, x, wrong, ThreatModel("l2", 0.0), method="deepfool")
    assert bool((d[:4] == 0).all()) and bool((d[4:] > 0).all())
    assert torch.allclose(d[4:], _exact(model, x, y, 2.0)[4:] * 1.02, rtol=1e-3, atol=1e-4)


def test_not_found_is_inf():
    class Constant(nn.Module):  # always class 0, whatever the input: no adversarial example exists
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.stack([1 + 0 * x.flatten(1).sum(1) * self.w, torch.zeros(len(x))], dim=1)

    x, y = torch.rand(4, 1, 3, 3), torch.tensor([0, 0, 1, 1])
    d = minimal_perturbations(Constant(), x, y, ThreatModel("linf", 0.0), method="pgd", steps=3, search_steps=2)
    assert torch.isinf(d[:2]).all() and (d[2:] == 0).all()


def test_summary_values():
    s = summary(torch.tensor([0.0, 1.0, 2.0, math.inf]), torch.tensor([1.0, 2.0, 4.0, 1.0]))
    assert s["misclassified"] == 1 and s["n"] == 3  # the misclassified image is reported apart, not as distance 0
    assert s["found_fraction"] == pytest.approx(2 / 3) and s["median"] == 2.0 and s["mean"] == 1.5
    assert s["rho_adv"] == pytest.approx(0.5)
    weak = summary(torch.tensor([0.0, 0.0, 0.0, 0.3, 0.5]), torch.ones(5))  # a weak model: most already wrong
    assert weak["misclassified"] == 3 and weak["median"] == pytest.approx(0.3)
    assert summary(torch.tensor([math.inf, math.inf, 1.0]), torch.ones(3))["median"] == math.inf


def test_accuracy_curve_starts_at_clean_and_never_rises(linear_case):
    model, x, y = linear_case
    rows = accuracy_curve(model, x, y, ThreatModel("l2", 0.0), [0.0, 0.01, 0.03, 0.1, 1.0], steps=10)
    accs = [r["accuracy"] for r in rows]
    assert accs[0] == rows[0]["clean_accuracy"] == 1.0
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False)) and accs[-1] == 0.0


def test_histogram_is_a_png(tmp_path):
    path = plot_histogram({"a": torch.tensor([0.5, 1.0, math.inf]), "b": torch.rand(50)}, tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_stability_prints_statistics_and_writes_the_histogram(standard_run, tmp_path):
    out = tmp_path / "hist.png"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustopt",
            "stability",
            str(standard_run),
            "--subset",
            "20",
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    s = res["runs"][str(standard_run)]
    assert s["n"] + s["misclassified"] == 20 and 0 < s["median"] < 5 and s["found_fraction"] > 0.9
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(
        [sys.executable, "-m", "robustopt", "stability", str(standard_run), "--norm", "l5"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown norm" in bad.stderr


def test_cli_stability_out_folder_gets_the_file_inside_and_a_non_png_is_refused(standard_run, tmp_path):
    cmd = [sys.executable, "-m", "robustopt", "stability", str(standard_run), "--subset", "5", "--no-progress", "--out"]
    p = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    png = tmp_path / "stability_l2_deepfool.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"histogram {png}" in p.stdout
    assert not tmp_path.with_suffix(".png").exists()  # not written beside the folder
    bad = subprocess.run([*cmd, str(tmp_path / "hist")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "must be a .png file or an existing folder" in bad.stderr
