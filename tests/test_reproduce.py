"""``robustopt reproduce``: a tiny plan end to end, reuse and resume, and the claims computed from numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from robustopt.cli.app import main
from robustopt.errors import ConfigError, RunDirError
from robustopt.reproduce.claims import claims, compare, median_ratio_interval, sanity
from robustopt.reproduce.runner import Schedule, load_schedule, reproduce, run_dir

TINY = dict(
    nets=("baseline", "robust-linf"),
    radii={"linf": 0.2, "l2": 2.0},
    subset=1000,
    epochs=1,
    lr=0.05,
    eval_n=100,
    transfer_scales=(1.0,),
    attack_steps=2,
    curve_norms=("linf",),
    curve_scales=(1.0, 8.0),
    curve_n=50,
    curve_steps=2,
    minimal_n=20,
    deepfool_steps=10,
    examples=3,
    sanity_n=20,
    sanity_nets=("robust-linf",),
)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Schedule]:
    out = tmp_path_factory.mktemp("reproduce")
    schedule = Schedule(**TINY)
    results = reproduce(schedule, out, progress=False, log=quiet)
    return out, results, schedule


def test_end_to_end_outputs(tiny: tuple[Path, dict, Schedule]) -> None:
    out, results, schedule = tiny
    for name in ("report.md", "results.json", "accuracy_vs_eps.png", "minimal_perturbations.png", "examples.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    saved = json.loads((out / "results.json").read_text())  # strict JSON round trip
    assert set(saved["nets"]) == {"baseline", "robust-linf"}
    assert len(saved["transfer_sets"]) == 2  # 2 norms × 1 scale
    assert saved["radii"]["linf"]["pixel"] == pytest.approx(0.2 * 0.3081)
    assert schedule.train_config("robust-linf").pixel_eps == pytest.approx(saved["radii"]["linf"]["pixel"])
    report = (out / "report.md").read_text()
    assert "| test set | baseline | robust-linf |" in report
    assert "| attack against the net itself | baseline | robust-linf |" in report
    assert "| DeepFool minimal perturbation | baseline | robust-linf |" in report
    assert "| clean, paper (authors' code) | 99.09 | 99.34 |" in report
    assert "## Verdict: which of the paper's claims this run supports" in report and "## Claims in detail" in report
    checks = {name: {c["check"].split(",")[0] for c in saved["sanity"][name]} for name in saved["nets"]}
    assert {"evaluator: large_eps", "evaluator: more_steps", "PGD ≤ single-step", "white-box ≤ transfer"} <= checks["robust-linf"]
    assert {"PGD ≤ single-step", "white-box ≤ transfer"} <= checks["baseline"]  # sanity_nets: no evaluator checks here
    assert not any(c.startswith("evaluator") for c in checks["baseline"])
    assert saved["nets"]["robust-linf"]["eval"]["sanity"]["norm"] == "linf"


def test_numbers_are_consistent(tiny: tuple[Path, dict, Schedule]) -> None:
    out, results, _ = tiny
    for name, net in results["nets"].items():
        summary = json.loads((run_dir(out, name) / "summary.json").read_text())
        assert net["test_acc"] == summary["test_acc"]
        ev = net["eval"]
        # a transfer set against the baseline is the baseline's own single-step white-box attack
        if name == "baseline":
            for norm in ("linf", "l2"):
                assert ev["transfer"][f"{norm}@1"] == pytest.approx(ev["whitebox"][norm]["fgsm"])
        for wb in ev["whitebox"].values():
            assert 0 <= wb["pgd"] <= ev["clean"] + 0.02
        curve = ev["curves"]["linf"]
        assert curve[0][0] == 0 and [e for e, _ in curve] == sorted(e for e, _ in curve)
        m = ev["minimal"]["l2"]
        found = [d for d in m["dists"] if d is not None]
        assert m["found_fraction"] == pytest.approx(len(found) / len(m["dists"]))
        if found:
            assert m["mean"] == pytest.approx(sum(found) / len(found), rel=1e-5)


def test_second_invocation_reuses_runs_and_evaluations(tiny: tuple[Path, dict, Schedule]) -> None:
    out, first, schedule = tiny
    models = {p: os.stat(p).st_mtime_ns for p in (out / "runs").glob("*/model.safetensors")}
    evals = {p: os.stat(p).st_mtime_ns for p in (out / "eval").glob("*.json")}
    lines: list[str] = []
    again = reproduce(schedule, out, progress=False, log=lines.append)
    assert len(models) == 2 and {p: os.stat(p).st_mtime_ns for p in models} == models
    assert {p: os.stat(p).st_mtime_ns for p in evals} == evals
    assert all(net["status"] == "reused" for net in again["nets"].values())
    assert sum("evaluation reused" in line for line in lines) == 2
    assert again["nets"]["robust-linf"]["eval"] == first["nets"]["robust-linf"]["eval"]
    # the first (training) invocation's cost stays on record after a rerun that only reuses
    first_run, rerun = json.loads((out / "results.json").read_text())["invocations"][-2:]
    assert first_run["total"] == first["wall_seconds"]["total"] and first_run["evaluated"] == ["baseline", "robust-linf"]
    assert sorted(first_run["trained"]) == ["baseline", "robust-linf"] and rerun["trained"] == rerun["evaluated"] == []
    assert "Invocations into this directory: #1 " in (out / "report.md").read_text()


def test_unfinished_run_is_resumed_and_changed_schedule_refused(tiny: tuple[Path, dict, Schedule]) -> None:
    out, _, schedule = tiny
    (run_dir(out, "robust-linf") / "summary.json").unlink()  # as if killed after its last checkpoint
    again = reproduce(schedule, out, progress=False, log=quiet)
    assert again["nets"]["robust-linf"]["status"] == "resumed"
    assert (run_dir(out, "robust-linf") / "summary.json").is_file()
    with pytest.raises(RunDirError, match="different schedule"):
        reproduce(Schedule(**{**TINY, "epochs": 2}), out, progress=False, log=quiet)


# ----------------------------------------------------------------------------- claims from synthetic numbers


def _net(test_acc: float, transfer: float, pgd: float, median: float, fgsm: float | None = None, norm: str | None = None) -> dict:
    wb = {"eps": 0.06, "pgd": pgd, **({"fgsm": fgsm} if fgsm is not None else {})}
    ev = {
        "n": 1000,
        "clean": test_acc,
        "transfer": {"linf@1": transfer},
        "whitebox": {"linf": wb},
        "minimal": {"l2": {"median": median}},
        "curves": {},
    }
    return {"test_acc": test_acc, "norm": norm, "eval": ev}


def _results(robust: dict) -> dict:
    sets = {"linf@1": {"norm": "linf", "scale": 1.0, "eps": 0.06}}
    return {"nets": {"baseline": _net(0.99, 0.30, 0.05, 1.0), "robust-linf": robust}, "transfer_sets": sets, "n_test": 10000}


def _verdicts(results: dict) -> dict[str, dict]:
    return {c["claim"].split(":")[0]: c for c in claims(results)}


def test_claims_say_when_the_robust_net_loses() -> None:
    v = _verdicts(_results(_net(0.95, 0.10, 0.01, 0.5, fgsm=0.9, norm="linf")))
    assert v["resists adversarial examples made against the baseline"]["verdict"] == "not supported"
    assert "does NOT beat the baseline" in v["resists adversarial examples made against the baseline"]["text"]
    assert v["harder to generate"]["verdict"] == "not supported"
    assert v["clean accuracy does not suffer"]["verdict"] == "not supported"
    assert "LOWER" in v["clean accuracy does not suffer"]["text"]
    assert v["single-step robustness holds up under PGD (later work"]["verdict"] == "not supported"


def test_claims_supported_when_the_robust_net_wins() -> None:
    v = _verdicts(_results(_net(0.993, 0.80, 0.60, 2.0, fgsm=0.65, norm="linf")))
    assert {c["verdict"] for c in v.values()} == {"supported"}
    assert "higher than the baseline" in v["clean accuracy does not suffer"]["text"]


def test_differences_within_noise_are_not_wins() -> None:
    # 99.10 vs 99.09 on 10k images: far inside two standard errors
    assert compare(0.9910, 0.9909, 10000, 10000) == 0
    assert compare(0.99, 0.95, 10000, 10000) == 1 and compare(0.95, 0.99, 10000, 10000) == -1
    v = _verdicts(_results(_net(0.9910, 0.31, 0.06, 1.0)))
    assert v["resists adversarial examples made against the baseline"]["verdict"] == "not supported"
    assert "within noise" in v["resists adversarial examples made against the baseline"]["text"]
    assert v["clean accuracy does not suffer"]["verdict"] == "supported"
    assert "does not improve" in v["clean accuracy does not suffer"]["text"]


def test_distance_claim_needs_the_bootstrap_interval_above_one() -> None:
    """A 2% larger median over ~500 spread-out distances (the full MNIST run's robust-l1) is noise; ×1.3 is not."""
    rng = torch.Generator().manual_seed(0)
    base = (1.65 * torch.exp(0.3 * torch.randn(495, generator=rng))).tolist()
    close = (1.69 * torch.exp(0.3 * torch.randn(495, generator=rng))).tolist()
    far = (2.15 * torch.exp(0.3 * torch.randn(495, generator=rng))).tolist()
    lo, hi = median_ratio_interval(close, base)
    assert lo < 1 < hi
    lo, hi = median_ratio_interval(far, base)
    assert 1.15 < lo < hi < 1.5
    assert median_ratio_interval(far, base) == (lo, hi)  # fixed seed: same report every time
    for dists, verdict in ((close, "not supported"), (far, "supported")):
        robust = _net(0.99, 0.30, 0.05, float(torch.tensor(dists).median()))
        robust["eval"]["minimal"]["l2"]["dists"] = dists
        res = _results(robust)
        res["nets"]["baseline"]["eval"]["minimal"]["l2"]["dists"] = base
        claim = next(c for c in claims(res) if c["claim"].startswith("harder to generate: median"))
        assert claim["verdict"] == verdict, claim["text"]
        assert "bootstrap interval" in claim["text"]
    # a lost example (None: not found) counts as infinitely far, never as a failure of the net
    assert median_ratio_interval([None] * 10, [1.0] * 10)[0] == float("inf")


def test_sanity_flags_pgd_weaker_than_single_step_and_no_collapse() -> None:
    ev = {
        "clean": 0.9,
        "transfer": {"linf@1": 0.5},
        "whitebox": {"linf": {"eps": 0.1, "pgd": 0.7, "fgsm": 0.4}},
        "curves": {"linf": [[0.0, 0.9], [0.1, 0.7], [0.5, 0.6]]},
    }
    failed = {c["check"].split(",")[0] for c in sanity(ev) if not c["passed"]}
    assert failed == {"PGD ≤ single-step", "white-box ≤ transfer", "≈0 at large ε"}
    ev["whitebox"]["linf"]["pgd"], ev["curves"]["linf"][-1][1] = 0.3, 0.0
    assert all(c["passed"] for c in sanity(ev))


# ----------------------------------------------------------------------------- schedules and the CLI


def test_schedules_and_config_overrides(tmp_path: Path) -> None:
    quick, full = load_schedule("mnist", "quick"), load_schedule("mnist", "full")
    assert quick.net_names() == full.net_names()
    assert full.pixel_radius("l2") == pytest.approx(0.6162) and full.pixel_radius("l1") == pytest.approx(0.6162)
    assert full.train_config("pgd-linf").inner_steps == full.pgd_steps
    assert full.train_config("goodfellow-linf").clean_weight == 0.5
    cifar = load_schedule("cifar10", "full")
    assert "resnet18/robust-l2" in cifar.net_names() and cifar.train_config("resnet18/robust-l2").model == "resnet18"
    assert "paper-cifar/baseline" in cifar.net_names()  # the authors' VGG-BN net is in the full CIFAR plan
    cifar_quick = load_schedule("cifar10", "quick")
    assert cifar_quick.net_names() == ["baseline", "robust-l2"]
    assert cifar_quick.train_config("robust-l2").model == "resnet18" and cifar_quick.train_config("baseline").test_subset == 1000
    assert cifar_quick.pixel_radius("l2") == pytest.approx(0.2 * (0.2470 + 0.2435 + 0.2616) / 3, rel=1e-3)
    cfg = tmp_path / "s.toml"
    cfg.write_text('epochs = 3\nnets = ["baseline", "robust-l2"]\n')
    s = load_schedule("mnist", "quick", cfg)
    assert s.epochs == 3 and s.nets == ("baseline", "robust-l2") and s.subset == quick.subset
    for bad in ('nets = ["robust-l2"]', 'nets = ["baseline", "robust-l7"]', "epochs = 0", "colour = 1", 'lr = "fast"'):
        cfg.write_text(bad + "\n")
        with pytest.raises(ConfigError):
            load_schedule("mnist", "full", cfg)
    with pytest.raises(ConfigError, match="mnist and cifar10"):
        load_schedule("imagenet")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('nets = ["robust-l2"]\n')
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "mnist", "--config", str(cfg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("robustopt: error:") and "baseline" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- seeds and early validation


def test_seeds_report_mean_and_std_and_reuse_the_first_seed(tmp_path: Path) -> None:
    """--seeds 2 after a single-seed run: seed 1's run and evaluation are reused, seed 2's trained; figures are mean ± std."""
    import statistics

    mini = {**TINY, "nets": ("baseline",), "radii": {"linf": 0.2}, "subset": 300, "eval_n": 40, "curve_n": 20}
    mini.update(minimal_n=10, sanity_n=0, examples=0)
    mini.pop("sanity_nets")
    reproduce(Schedule(**mini), tmp_path, progress=False, log=quiet)
    two = reproduce(Schedule(**{**mini, "seeds": 2}), tmp_path, progress=False, log=quiet)
    assert two["seeds"] == [1, 2]
    net = two["nets"]["baseline"]
    runs = net["runs"]
    assert [r["seed"] for r in runs] == [1, 2] and [Path(r["run_dir"]).name for r in runs] == ["baseline", "baseline-seed2"]
    assert [r["status"] for r in runs] == ["reused", "trained"]
    assert json.loads((tmp_path / "runs" / "baseline-seed2" / "config.json").read_text())["train"]["seed"] == 2
    accs = [r["test_acc"] for r in runs]
    assert net["test_acc"] == pytest.approx(statistics.fmean(accs))
    assert net["std"]["test_acc"] == pytest.approx(statistics.stdev(accs))
    evals = [json.loads((tmp_path / "eval" / f"baseline{sfx}.json").read_text()) for sfx in ("", "-seed2")]
    pgd = [ev["whitebox"]["linf"]["pgd"] for ev in evals]
    assert net["eval"]["whitebox"]["linf"]["pgd"] == pytest.approx(statistics.fmean(pgd))
    assert net["std"]["eval"]["whitebox"]["linf"]["pgd"] == pytest.approx(statistics.stdev(pgd))
    assert net["eval"]["minimal"]["l2"]["dists"] == [d for ev in evals for d in ev["minimal"]["l2"]["dists"]]  # pooled
    report = (tmp_path / "report.md").read_text()
    assert "mean ± std over 2 seeds" in report and " ± " in report.split("| test set |")[1].splitlines()[2]
    assert sum(c["check"].endswith(", seed 2") for c in two["sanity"]["baseline"]) > 0
    assert two["invocations"][-1]["evaluated"] == ["baseline-seed2"]  # seed 1's evaluation came from the cache


def test_seed_spread_widens_the_noise_band() -> None:
    # 99.40 vs 99.09 on 10k images: a win with one seed; within noise when the seeds scatter by 0.2 points
    assert compare(0.9940, 0.9909, 10000, 10000) == 1
    assert compare(0.9940, 0.9909, 10000, 10000, sd=(0.002, 0.002), k=3) == 0
    assert compare(0.9940, 0.9909, 10000, 10000, sd=(0.0002, 0.0002), k=3) == 1


@pytest.mark.parametrize(
    "bad",
    [
        'curve_norms = ["l3"]',
        'curve_norms = ["l1"]',  # a norm without a training radius (radii below has linf only)
        "curve_scales = []",
        "transfer_scales = [-1.0]",
        'transfer_scales = ["x"]',
        'minimal_norms = ["l5"]',
        "examples = -3",
        'sanity_nets = ["nope"]',
        "seeds = 0",
        'nets = "baseline"',
        'nets = ["baseline", "baseline"]',
        "radii = {linf = -0.2}",
        'models = ["resnet-9000"]',
        "test_n = 0",
    ],
)
def test_whole_schedule_is_validated_before_anything_trains(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(('radii = {linf = 0.2}\nnets = ["baseline", "robust-linf"]\n' if "l1" in bad else "") + bad + "\n")
    with pytest.raises(ConfigError):
        load_schedule("mnist", "full", cfg)


def test_cli_seeds_and_schedule_flags(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from robustopt.reproduce import runner

    seen: list[tuple[Schedule, str]] = []
    monkeypatch.setattr(runner, "reproduce", lambda s, where, plan, **kw: seen.append((s, plan)))
    with pytest.raises(SystemExit) as ok:
        main(["reproduce", "mnist", "--schedule", "authors", "--seeds", "3", "--out", str(tmp_path / "a")])
    assert ok.value.code in (0, None)
    s, plan = seen[-1]
    assert plan == "authors" and s.seeds == 3 and s.epochs == 120 and [r.seed for r in s.replicas()] == [1, 2, 3]
    for argv in (["--quick", "--schedule", "authors"], ["--seeds", "0"], ["--schedule", "weekly"]):
        with pytest.raises(SystemExit) as e:
            main(["reproduce", "mnist", *argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("robustopt: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and len(seen) == 1


def test_authors_plans_and_the_example_columns() -> None:
    import numpy as np

    from robustopt.reproduce.plots import disagreements

    mnist, cifar = load_schedule("mnist", "authors"), load_schedule("cifar10", "authors")
    assert (mnist.epochs, mnist.pgd_epochs, mnist.subset, mnist.eval_n) == (120, 120, None, 10000)
    assert (cifar.models, cifar.epochs, cifar.lr, cifar.lr_step) == (("paper-cifar",), 300, 1.0, 25)
    # rows = nets, columns = images: only columns where some net is fooled and another is not are shown
    correct = np.array([[1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1]], dtype=bool)
    idx, disagree = disagreements(correct, 8)
    assert disagree and idx.tolist() == [1, 4]
    idx, disagree = disagreements(np.ones((2, 5), dtype=bool), 3)
    assert not disagree and idx.tolist() == [0, 1, 2]  # no disagreement: the first images, and the title says so
