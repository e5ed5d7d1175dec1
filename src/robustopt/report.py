"""The reproduce report: results.json, report.md and the claims statement, all computed from the numbers.

The paper (Shaham et al., arXiv 1511.05432) claims that robust optimisation (1) makes a net resist
adversarial examples built against a baseline, (2) makes new adversarial examples harder to
generate and (3) does not cost (even improves) clean accuracy. :func:`claims` checks each claim
per net against the baseline with a two-standard-error rule: a difference smaller than
``2·sqrt(p(1-p)/n + q(1-q)/n)`` is called *inconclusive*, never a win.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

NORM_LABEL = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}
FAST_NAME = {"linf": "FGSM", "l2": "fast ℓ2", "l1": "fast ℓ1 (one pixel)"}
# Clean test accuracy noted in the authors' public code (PAPER.md); MNIST, paper-mnist.
PAPER_CLEAN = {"mnist": {"baseline": 0.9909, "robust-linf": 0.9934, "robust-l2": 0.9929, "robust-l1": 0.9912}}
TOL = 0.01  # slack of the sanity checks (random starts, small n)


def compare(a: float, b: float, n_a: int, n_b: int) -> int:
    """+1 if accuracy a is above b by more than two standard errors, -1 if below, 0 if within noise."""
    se = math.sqrt(a * (1 - a) / max(n_a, 1) + b * (1 - b) / max(n_b, 1))
    margin = max(2 * se, 1e-9)
    return 1 if a - b > margin else -1 if b - a > margin else 0


def pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def transfer_sets(schedule: Any) -> dict[str, dict[str, Any]]:
    """Metadata of the transfer test sets, keyed as in the evaluation (``norm@scale``)."""
    return {
        f"{norm}@{scale:g}": {"norm": norm, "scale": scale, "eps": schedule.pixel_radius(norm) * scale}
        for norm in schedule.radii
        for scale in schedule.transfer_scales
    }


def transfer_label(meta: dict[str, Any]) -> str:
    return f"{FAST_NAME[meta['norm']]} vs baseline, {NORM_LABEL[meta['norm']]} ε={meta['eps']:.4g} (×{meta['scale']:g})"


def groups(schedule: Any) -> list[tuple[str, list[str]]]:
    """(model, net names) per model: each model has its own baseline and table."""
    if len(schedule.models) == 1:
        return [(schedule.models[0], list(schedule.nets))]
    return [(m, [f"{m}/{n}" for n in schedule.nets]) for m in schedule.models]


def baseline_of(name: str) -> str:
    model, slash, _ = name.rpartition("/")
    return f"{model}{slash}baseline"


# ----------------------------------------------------------------------------- sanity checks


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def evaluator_checks(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluator's own checks (:mod:`robustopt.sanity`), flattened into report rows."""
    san = ev.get("sanity") or {}
    rows = []
    for key, c in (san.get("checks") or {}).items():
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in c.items() if k not in ("passed", "message"))
        rows.append(
            {
                "check": f"evaluator: {key}, {NORM_LABEL[san['norm']]} ε={san['eps']:.4g}",
                "passed": bool(c["passed"]),
                "detail": f"{c['message']}: {nums}",
            }
        )
    return rows


def sanity(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks of one net's evaluation that a correct attack must pass; a failure hints at gradient masking.

    The evaluator's checks, then consistency checks across the tables (every norm, every radius)."""
    checks = evaluator_checks(ev)

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    for norm, wb in ev["whitebox"].items():
        lab = f"{NORM_LABEL[norm]} ε={wb['eps']:.4g}"
        if "fgsm" in wb:
            add(
                f"PGD ≤ single-step, {lab}",
                wb["pgd"] <= wb["fgsm"] + TOL,
                f"PGD {pct(wb['pgd'])}% vs single-step {pct(wb['fgsm'])}%",
            )
            add(
                f"single-step ≤ clean, {lab}", wb["fgsm"] <= ev["clean"] + TOL, f"{pct(wb['fgsm'])}% vs clean {pct(ev['clean'])}%"
            )
        key = f"{norm}@1"
        if key in ev["transfer"]:
            t = ev["transfer"][key]
            add(f"white-box ≤ transfer, {lab}", wb["pgd"] <= t + TOL, f"white-box PGD {pct(wb['pgd'])}% vs transfer {pct(t)}%")
    for norm, points in ev["curves"].items():
        accs = [a for _, a in points]
        add(
            f"accuracy falls with ε, {NORM_LABEL[norm]}",
            all(b <= a + 2 * TOL for a, b in zip(accs, accs[1:], strict=False)),
            " → ".join(pct(a) for a in accs),
        )
        add(f"≈0 at large ε, {NORM_LABEL[norm]} ε={points[-1][0]:.3g}", accs[-1] <= 0.05, f"{pct(accs[-1])}%")
    return checks


# ----------------------------------------------------------------------------- claims


def _verdict(wins: int, losses: int, total: int) -> str:
    if total and wins == total:
        return "supported"
    return "not supported" if wins == 0 else "partly supported"


def claim_transfer(name: str, nets: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Claim 1: the net resists the adversarial test sets built against the baseline (beats the baseline on them)."""
    ev, base = nets[name]["eval"], nets[baseline_of(name)]["eval"]
    n = ev["n"]
    cmp = {k: compare(ev["transfer"][k], base["transfer"][k], n, base["n"]) for k in sets}
    wins, losses = sum(c > 0 for c in cmp.values()), sum(c < 0 for c in cmp.values())
    not_beaten = [
        f"{transfer_label(sets[k])}: {pct(ev['transfer'][k])}% vs baseline {pct(base['transfer'][k])}%"
        + (" (lower)" if c < 0 else " (within noise)")
        for k, c in cmp.items()
        if c <= 0
    ]
    text = f"beats the baseline on {wins}/{len(cmp)} transfer test sets"
    if not_beaten:
        text += "; does NOT beat the baseline on " + "; ".join(not_beaten)
    return {
        "claim": "resists adversarial examples made against the baseline",
        "net": name,
        "verdict": _verdict(wins, losses, len(cmp)),
        "text": text,
    }


def claim_harder(name: str, nets: dict[str, Any]) -> list[dict[str, Any]]:
    """Claim 2: new adversarial examples are harder to generate: larger DeepFool distances, higher white-box PGD accuracy."""
    ev, base = nets[name]["eval"], nets[baseline_of(name)]["eval"]
    out = []
    for norm, m in ev["minimal"].items():
        b = base["minimal"][norm]
        ratio = m["median"] / b["median"] if b["median"] and math.isfinite(b["median"]) else float("nan")
        ok = ratio > 1
        out.append(
            {
                "claim": f"harder to generate: median DeepFool {NORM_LABEL[norm]} distance above the baseline's",
                "net": name,
                "verdict": "supported" if ok else "not supported",
                "text": f"median {m['median']:.3g} vs baseline {b['median']:.3g} (×{ratio:.2f})"
                + ("" if ok else ": does NOT exceed the baseline"),
            }
        )
    cmp = {nrm: compare(wb["pgd"], base["whitebox"][nrm]["pgd"], ev["n"], base["n"]) for nrm, wb in ev["whitebox"].items()}
    wins = sum(c > 0 for c in cmp.values())
    text = "; ".join(
        f"PGD {NORM_LABEL[nrm]}: {pct(ev['whitebox'][nrm]['pgd'])}% vs baseline {pct(base['whitebox'][nrm]['pgd'])}%"
        + {1: "", 0: " (within noise: NOT above the baseline)", -1: " (lower: NOT above the baseline)"}[c]
        for nrm, c in cmp.items()
    )
    out.append(
        {
            "claim": "harder to generate: white-box PGD accuracy above the baseline's at the training radii",
            "net": name,
            "verdict": _verdict(wins, len(cmp) - wins, len(cmp)),
            "text": text,
        }
    )
    return out


def claim_clean(name: str, nets: dict[str, Any], n_test: int) -> dict[str, Any]:
    """Claim 3: clean accuracy does not suffer (the paper: it improves). Full test set."""
    a, b = nets[name]["test_acc"], nets[baseline_of(name)]["test_acc"]
    c = compare(a, b, n_test, n_test)
    words = {
        1: "higher than the baseline (improves)",
        0: "within noise of the baseline (does not suffer, does not improve)",
        -1: "LOWER than the baseline (it suffers)",
    }
    return {
        "claim": "clean accuracy does not suffer",
        "net": name,
        "verdict": "not supported" if c < 0 else "supported",
        "text": f"{pct(a, 2)}% vs baseline {pct(b, 2)}%: {words[c]}",
    }


def caveat_masking(name: str, nets: dict[str, Any]) -> dict[str, Any] | None:
    """Later work: single-step accuracy overstates robustness when PGD finds much more (gradient masking)."""
    ev, norm = nets[name]["eval"], nets[name].get("norm")
    wb = ev["whitebox"].get(norm) if norm else None
    if not wb or "fgsm" not in wb:
        return None
    gap = wb["fgsm"] - wb["pgd"]
    return {
        "claim": "single-step robustness holds up under PGD (later work: it often does not)",
        "net": name,
        "verdict": "not supported" if gap > 0.1 else "supported",
        "text": f"white-box {NORM_LABEL[norm]} single-step {pct(wb['fgsm'])}% vs PGD {pct(wb['pgd'])}% (gap {pct(gap)} pt)",
    }


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim for every non-baseline net, computed from ``results['nets']``."""
    nets, sets, out = results["nets"], results["transfer_sets"], []
    for name in nets:
        if name.rpartition("/")[2] == "baseline":
            continue
        out.append(claim_transfer(name, nets, sets))
        out.extend(claim_harder(name, nets))
        out.append(claim_clean(name, nets, results.get("n_test", 10000)))
        caveat = caveat_masking(name, nets)
        if caveat:
            out.append(caveat)
    return out


# ----------------------------------------------------------------------------- results


def assemble(
    schedule: Any,
    train_info: dict[str, Any],
    evals: dict[str, Any],
    *,
    quick: bool,
    provenance: dict[str, Any],
    n_test: int = 10000,
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
        "n_test": n_test,
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


def main_table(results: dict[str, Any], names: list[str]) -> str:
    """Rows = test sets, columns = nets (accuracy %), with the paper's clean numbers alongside."""
    nets, paper = results["nets"], results["paper_clean"]
    n = nets[names[0]]["eval"]["n"]
    rows = [
        [f"clean, full test set ({results['n_test']})"] + [pct(nets[k]["test_acc"], 2) for k in names],
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
    return "\n".join(
        [
            f"Models: {', '.join(s['models'])}. Nets: {', '.join(s['nets'])}. Training images: {subset}; epochs: {s['epochs']} "
            f"(PGD-AT: {s['pgd_epochs']} epochs with {s['pgd_steps']} inner steps). Optimiser: SGD lr {s['lr']:g} "
            f"({s['lr_schedule']}), momentum {s['momentum']:g}, batch {s['batch_size']}, weight decay {s['weight_decay']:g}; "
            f"seed {s['seed']}. The paper's baseline trained 120 epochs: these schedules are far shorter.",
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
            f"(training phase {w.get('train_phase', math.nan):.0f} s). "
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
