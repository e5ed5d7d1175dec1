"""The reproduce report: results.json and report.md, all computed from the numbers.

:func:`assemble` gathers the schedule, the training summaries and the evaluations into one results
dict and adds the sanity checks and claims (:mod:`robustopt.reproduce.claims`); :func:`render` writes it as
markdown in the paper's layout (rows are test sets, columns are nets).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from robustopt.reproduce.claims import FAST_NAME, NORM_LABEL, claims, groups, pct, sanity, transfer_label, transfer_sets
from robustopt.reproduce.seeds import at, cell, combine_seeds

# Clean test accuracy noted in the authors' public code (PAPER.md); MNIST, paper-mnist.
PAPER_EPOCHS = {"mnist": 120, "cifar10": 300}  # the authors' code (PAPER.md)
PAPER_CLEAN = {"mnist": {"baseline": 0.9909, "robust-linf": 0.9934, "robust-l2": 0.9929, "robust-l1": 0.9912}}


# ----------------------------------------------------------------------------- results


def seed_sanity(replicas: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The sanity checks of every seed's evaluation; with several seeds each check names its seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for seed, info, evals in replicas:
        for name in info:
            tag = f", seed {seed}" if len(replicas) > 1 else ""
            out.setdefault(name, []).extend({**c, "check": c["check"] + tag} for c in sanity(evals[name]))
    return out


def assemble(
    schedule: Any,
    replicas: list[tuple[int, dict[str, Any], dict[str, Any]]],
    *,
    plan: str,
    provenance: dict[str, Any],
    n_test: int = 10000,
    n_test_total: int | None = None,
) -> dict[str, Any]:
    """Collect schedule, training summaries and evaluations (one pair per seed) into one results dict, with sanity
    checks and claims. Every figure under ``nets`` is the mean over seeds; ``nets[name]["std"]`` holds the stds."""
    nets = combine_seeds(replicas)
    results = {
        "dataset": schedule.dataset,
        "plan": plan,
        "quick": plan == "quick",
        "seeds": [seed for seed, _, _ in replicas],
        "schedule": dataclasses.asdict(schedule),
        "radii": {
            n: {"given": r, "units": schedule.eps_units, "pixel": schedule.pixel_radius(n)} for n, r in schedule.radii.items()
        },
        "paper_clean": PAPER_CLEAN.get(schedule.dataset, {}),
        "groups": groups(schedule),
        "transfer_sets": transfer_sets(schedule),
        "n_test": n_test,  # images behind each net's test_acc (the first n_test of n_test_total)
        "n_test_total": n_test_total or n_test,
        "nets": nets,
        "provenance": provenance,
    }
    results["sanity"] = seed_sanity(replicas)
    results["claims"] = claims(results)
    return results


def strip_for_json(results: dict[str, Any]) -> dict[str, Any]:
    """A copy without the per-image distance lists and with NaN/inf as null (strict JSON)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k != "dists"}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(results)


# ----------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _short(name: str) -> str:
    return name.rpartition("/")[2]


def test_set_label(results: dict[str, Any]) -> str:
    n, total = results["n_test"], results["n_test_total"]
    return f"clean, full test set ({n})" if n >= total else f"clean, first {n} of {total} test images"


def main_table(results: dict[str, Any], names: list[str]) -> str:
    """Rows = test sets, columns = nets (accuracy %), with the paper's clean numbers alongside."""
    nets, paper = results["nets"], results["paper_clean"]
    n = nets[names[0]]["eval"]["n"]
    rows = [
        [test_set_label(results)] + [cell(nets[k], "test_acc", digits=2) for k in names],
        ["clean, paper (authors' code)"] + [pct(paper.get(_short(k)), 2) for k in names],
        [f"clean, first {n}"] + [cell(nets[k], "eval", "clean") for k in names],
    ]
    for key, meta in results["transfer_sets"].items():
        rows.append([transfer_label(meta)] + [cell(nets[k], "eval", "transfer", key) for k in names])
    return _table(["test set"] + [_short(k) for k in names], rows)


def whitebox_table(results: dict[str, Any], names: list[str]) -> str:
    nets, s = results["nets"], results["schedule"]
    first = nets[names[0]]["eval"]["whitebox"]
    rows = []
    for norm, wb in first.items():
        lab = f"{NORM_LABEL[norm]} ε={wb['eps']:.4g}"
        if "fgsm" in wb:
            rows.append(
                [f"{FAST_NAME[norm]} (single step), {lab}"] + [cell(nets[k], "eval", "whitebox", norm, "fgsm") for k in names]
            )
        rows.append(
            [f"PGD-{s['attack_steps']} ×{s['attack_restarts']} restart(s), {lab}"]
            + [cell(nets[k], "eval", "whitebox", norm, "pgd") for k in names]
        )
        if any(at(nets[k], "eval", "verified", norm) for k in names):
            rows.append([f"verified (IBP) ≤ PGD, {lab}"] + [_verified_cell(nets[k], norm) for k in names])
    return _table(["attack against the net itself"] + [_short(k) for k in names], rows)


def _verified_cell(net: dict[str, Any], norm: str) -> str:
    v = at(net, "eval", "verified", norm)
    if not v:
        return "–"
    return "n/a" if v.get("accuracy") is None else cell(net, "eval", "verified", norm, "accuracy")


def verified_note(results: dict[str, Any], names: list[str]) -> str:
    """What the verified rows mean, and why a cell is "n/a"."""
    why = {(at(results["nets"][k], "eval", "verified", n) or {}).get("reason") for k in names for n in results["radii"]}
    why.discard(None)
    if not any(at(results["nets"][k], "eval", "verified") for k in names):
        return ""
    text = ("Verified (IBP, interval bound propagation) is a guaranteed lower bound on robust accuracy on the same images "
            "(PGD gives an upper bound); nets not trained for certification are usually verified on few images.")  # fmt: skip
    return text + "".join(f" n/a: {r}." for r in sorted(why))


def minimal_table(results: dict[str, Any], names: list[str]) -> str:
    nets = results["nets"]
    rows = []
    for norm in nets[names[0]]["eval"]["minimal"]:
        lab = NORM_LABEL[norm]

        def row(label: str, key: str, digits: int, scale: float, nrm: str = norm) -> list[str]:
            return [label] + [cell(nets[k], "eval", "minimal", nrm, key, digits=digits, scale=scale) for k in names]

        rows += [
            row(f"median {lab} distance", "median", 3, 1.0),
            row(f"mean {lab} distance (found)", "mean", 3, 1.0),
            row(f"ρ_adv = mean ‖r‖/‖x‖ ({lab})", "rho_adv", 3, 1.0),
            row("found (label flipped, %)", "found_fraction", 1, 100.0),
            row("images (correctly classified)", "n", 0, 1.0),
        ]
    return _table(["DeepFool minimal perturbation"] + [_short(k) for k in names], rows)


def setup_section(results: dict[str, Any]) -> str:
    s = results["schedule"]
    radii = _table(
        ["norm", f"paper radius ({s['eps_units']})", "pixel radius (used)"],
        [[NORM_LABEL[n], f"{r['given']:g}", f"{r['pixel']:.4g}"] for n, r in results["radii"].items()],
    )
    subset = "all" if s["subset"] is None else str(s["subset"])
    authors = PAPER_EPOCHS.get(results["dataset"])
    paper_epochs = f" The authors trained {authors} epochs: this schedule is shorter." if authors else ""
    return "\n".join(
        [
            f"Models: {', '.join(s['models'])}. Nets: {', '.join(s['nets'])}. Training images: {subset}; epochs: {s['epochs']} "
            f"(PGD-AT: {s['pgd_epochs']} epochs with {s['pgd_steps']} inner steps). Optimiser: SGD lr {s['lr']:g} "
            f"({s['lr_schedule']}), momentum {s['momentum']:g}, batch {s['batch_size']}, weight decay {s['weight_decay']:g}. "
            f"{seeds_sentence(results)}{paper_epochs}",
            "",
            f"Evaluation on the first {s['eval_n']} test images: transfer sets built against the baseline with the paper's fast "
            f"methods at ×{', ×'.join(f'{x:g}' for x in s['transfer_scales'])} the training radii; white-box single-step and "
            f"PGD-{s['attack_steps']} ({s['attack_restarts']} restart(s)); accuracy-vs-ε curves with PGD-{s['curve_steps']} on "
            f"{s['curve_n']} images; DeepFool ({s['deepfool_steps']} steps) on {s['minimal_n']} images.",
            "",
            radii,
        ]
    )


def seeds_sentence(results: dict[str, Any]) -> str:
    seeds = results.get("seeds") or [results["schedule"]["seed"]]
    if len(seeds) == 1:
        return f"Seed {seeds[0]}."
    listed = ", ".join(map(str, seeds))
    return f"Seeds {listed}: every net trained and evaluated once per seed; figures are mean ± std over {len(seeds)} seeds."


def verdict_table(results: dict[str, Any]) -> str:
    """Claim × net, one verdict per cell: the summary a reader wants first."""
    rows: dict[str, dict[str, str]] = {}
    for c in results["claims"]:
        rows.setdefault(c["claim"], {})[c["net"]] = c["verdict"]
    nets = [n for n in results["nets"] if _short(n) != "baseline"]
    if not rows:
        return "No claims: the plan has no net besides the baseline."
    return _table(["claim"] + nets, [[claim] + [v.get(n, "–") for n in nets] for claim, v in rows.items()])


def claims_section(results: dict[str, Any]) -> str:
    lines = ["Computed from the numbers above (differences within two standard errors count as no difference):", ""]
    for c in results["claims"]:
        lines.append(f"- **{c['net']}**: *{c['claim']}*: **{c['verdict']}**: {c['text']}.")
    return "\n".join(lines)


def sanity_section(results: dict[str, Any]) -> str:
    failed = [(n, c) for n, cs in results["sanity"].items() for c in cs if not c["passed"]]
    total = sum(len(cs) for cs in results["sanity"].values())
    head = f"{total - len(failed)}/{total} checks passed."
    if not failed:
        return head + " No sign of gradient masking from these checks."
    rows = [[n, c["check"], c["detail"]] for n, c in failed]
    return head + " **FAILED (possible gradient masking or a too-weak attack):**\n\n" + _table(["net", "check", "numbers"], rows)


def history_sentence(results: dict[str, Any]) -> str:
    """Every invocation into the directory, so that a reusing rerun does not hide the first run's cost."""
    runs = results.get("invocations") or []
    if len(runs) < 2:
        return ""

    def one(i: int, r: dict[str, Any]) -> str:
        trained, evaluated = len(r.get("trained") or []), len(r.get("evaluated") or [])
        return f"#{i} {r.get('total', math.nan):.0f} s (trained {trained}, evaluated {evaluated})"

    return "Invocations into this directory: " + "; ".join(one(i, r) for i, r in enumerate(runs, 1)) + ". "


def provenance_section(results: dict[str, Any]) -> str:
    p, nets = results["provenance"], results["nets"]
    rows = [
        [k, str(r["seed"]), r["status"], f"{v['epochs']}", f"{r['train_seconds'] or 0:.0f}", f"{r['eval_seconds'] or 0:.0f}"]
        for k, v in nets.items()
        for r in v["runs"]
    ]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    w = results.get("wall_seconds", {})
    return "\n".join(
        [
            f"Device: {p['device']} ({p['cpu_threads']} threads), {p['platform']}. Versions: {versions}. "
            f"Git commit: {p['git_commit'] or 'unknown'}. Each run's seed drives its training and the attacks on it.",
            "",
            f"Wall time of this invocation: {w.get('total', math.nan):.0f} s "
            f"(training phase {w.get('train_phase', math.nan):.0f} s). {history_sentence(results)}"
            "Per net (training seconds are from when it was trained; evaluation from when it was computed):",
            "",
            _table(["net", "seed", "this invocation", "epochs", "train s", "eval s"], rows),
        ]
    )


def render(results: dict[str, Any]) -> str:
    """report.md: setup, the main table, white-box and minimal-perturbation tables, plots, claims, checks, provenance."""
    parts = [
        f"# robustopt reproduce {results['dataset']} ({results.get('plan', 'full')})",
        "",
        "Shaham, Yamada & Negahban, *Understanding Adversarial Training* (arXiv 1511.05432), re-run by `robustopt`.",
        "",
        "## Verdict: which of the paper's claims this run supports",
        "",
        "One row per claim, one column per net, each judged against the baseline; the numbers behind every verdict are "
        "under *Claims in detail* below.",
        "",
        verdict_table(results),
        "",
        "## Setup",
        "",
        setup_section(results),
    ]
    for model, names in results["groups"]:
        sub = f" — {model}" if len(results["groups"]) > 1 else ""
        parts += [
            "",
            f"## Accuracy (%) on the paper's test sets{sub}",
            "",
            "Rows are test sets, columns are nets. The baseline column of the transfer rows is a white-box single-step "
            "attack on the baseline itself.",
            "",
            main_table(results, names),
            "",
            f"## White-box accuracy (%){sub}",
            "",
            whitebox_table(results, names),
            "",
            verified_note(results, names),
            "",
            f'## Minimal perturbations ("harder to generate"){sub}',
            "",
            minimal_table(results, names),
        ]
    parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in results.get("plots", [])]
    parts += ["", "## Claims in detail", "", claims_section(results)]
    parts += ["", "## Sanity checks", "", sanity_section(results), "", "## Provenance", "", provenance_section(results), ""]
    return "\n".join(parts)
