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

# Clean test accuracy noted in the authors' public code (PAPER.md); MNIST, paper-mnist.
PAPER_EPOCHS = {"mnist": 120, "cifar10": 300}  # the authors' code (PAPER.md)
PAPER_CLEAN = {"mnist": {"baseline": 0.9909, "robust-linf": 0.9934, "robust-l2": 0.9929, "robust-l1": 0.9912}}


# ----------------------------------------------------------------------------- results


def assemble(
    schedule: Any,
    train_info: dict[str, Any],
    evals: dict[str, Any],
    *,
    quick: bool,
    provenance: dict[str, Any],
    n_test: int = 10000,
    n_test_total: int | None = None,
) -> dict[str, Any]:
    """Collect schedule, training summaries and evaluations into one results dict, then add sanity checks and claims."""
    nets = {name: {**train_info[name], "eval": {k: v for k, v in evals[name].items() if k != "key"}} for name in train_info}
    results = {
        "dataset": schedule.dataset,
        "quick": quick,
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
    results["sanity"] = {name: sanity(net["eval"]) for name, net in nets.items()}
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
        [test_set_label(results)] + [pct(nets[k]["test_acc"], 2) for k in names],
        ["clean, paper (authors' code)"] + [pct(paper.get(_short(k)), 2) for k in names],
        [f"clean, first {n}"] + [pct(nets[k]["eval"]["clean"]) for k in names],
    ]
    for key, meta in results["transfer_sets"].items():
        rows.append([transfer_label(meta)] + [pct(nets[k]["eval"]["transfer"][key]) for k in names])
    return _table(["test set"] + [_short(k) for k in names], rows)


def whitebox_table(results: dict[str, Any], names: list[str]) -> str:
    nets, s = results["nets"], results["schedule"]
    first = nets[names[0]]["eval"]["whitebox"]
    rows = []
    for norm, wb in first.items():
        lab = f"{NORM_LABEL[norm]} ε={wb['eps']:.4g}"
        if "fgsm" in wb:
            rows.append(
                [f"{FAST_NAME[norm]} (single step), {lab}"] + [pct(nets[k]["eval"]["whitebox"][norm]["fgsm"]) for k in names]
            )
        rows.append(
            [f"PGD-{s['attack_steps']} ×{s['attack_restarts']} restart(s), {lab}"]
            + [pct(nets[k]["eval"]["whitebox"][norm]["pgd"]) for k in names]
        )
    return _table(["attack against the net itself"] + [_short(k) for k in names], rows)


def minimal_table(results: dict[str, Any], names: list[str]) -> str:
    nets = results["nets"]
    rows = []
    for norm in nets[names[0]]["eval"]["minimal"]:
        m = {k: nets[k]["eval"]["minimal"][norm] for k in names}
        lab = NORM_LABEL[norm]
        rows += [
            [f"median {lab} distance"] + [f"{m[k]['median']:.3f}" for k in names],
            [f"mean {lab} distance (found)"] + [f"{m[k]['mean']:.3f}" for k in names],
            [f"ρ_adv = mean ‖r‖/‖x‖ ({lab})"] + [f"{m[k]['rho_adv']:.3f}" for k in names],
            ["found (label flipped)"] + [pct(m[k]["found_fraction"]) + "%" for k in names],
            ["images (correctly classified)"] + [str(m[k]["n"]) for k in names],
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
            f"({s['lr_schedule']}), momentum {s['momentum']:g}, batch {s['batch_size']}, weight decay {s['weight_decay']:g}; "
            f"seed {s['seed']}.{paper_epochs}",
            "",
            f"Evaluation on the first {s['eval_n']} test images: transfer sets built against the baseline with the paper's fast "
            f"methods at ×{', ×'.join(f'{x:g}' for x in s['transfer_scales'])} the training radii; white-box single-step and "
            f"PGD-{s['attack_steps']} ({s['attack_restarts']} restart(s)); accuracy-vs-ε curves with PGD-{s['curve_steps']} on "
            f"{s['curve_n']} images; DeepFool ({s['deepfool_steps']} steps) on {s['minimal_n']} images.",
            "",
            radii,
        ]
    )


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
        [k, v["status"], f"{v['epochs']}", f"{v['train_seconds'] or 0:.0f}", f"{v['eval'].get('eval_seconds', 0):.0f}"]
        for k, v in nets.items()
    ]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    w = results.get("wall_seconds", {})
    return "\n".join(
        [
            f"Device: {p['device']} ({p['cpu_threads']} threads), {p['platform']}. Versions: {versions}. "
            f"Git commit: {p['git_commit'] or 'unknown'}. Seed: {results['schedule']['seed']} (training and attacks).",
            "",
            f"Wall time of this invocation: {w.get('total', math.nan):.0f} s "
            f"(training phase {w.get('train_phase', math.nan):.0f} s). {history_sentence(results)}"
            "Per net (training seconds are from when it was trained; evaluation from when it was computed):",
            "",
            _table(["net", "this invocation", "epochs", "train s", "eval s"], rows),
        ]
    )


def render(results: dict[str, Any]) -> str:
    """report.md: setup, the main table, white-box and minimal-perturbation tables, plots, claims, checks, provenance."""
    mode = "quick" if results["quick"] else "full"
    parts = [
        f"# robustopt reproduce {results['dataset']} ({mode})",
        "",
        "Shaham, Yamada & Negahban, *Understanding Adversarial Training* (arXiv 1511.05432), re-run by `robustopt`.",
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
            f'## Minimal perturbations ("harder to generate"){sub}',
            "",
            minimal_table(results, names),
        ]
    parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in results.get("plots", [])]
    parts += ["", "## Which of the paper's claims this run supports", "", claims_section(results)]
    parts += ["", "## Sanity checks", "", sanity_section(results), "", "## Provenance", "", provenance_section(results), ""]
    return "\n".join(parts)
