"""``robustopt evaluate``: flags mapped onto :func:`robustopt.evaluate`.

The common flags (``--attack``, ``--norm``, ``--eps``, ``--steps``, ``--restarts``, ...) are written
here once. Every other flag is derived from the attacks' own signatures
(:func:`robustopt.evaluation.attacks.attack_options`): each keyword-only option of a simple type
(``n_targets``, ``queries``, ``loss``, ``step_size``, ``p_init``, ...) becomes ``--n-targets`` and so
on, and a flag the chosen attack does not take is refused with the list of those it does. A new
attack file thus brings its flags with it.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import typer

from robustopt.errors import ConfigError
from robustopt.evaluation.attacks import ATTACKS, attack_options

COMMON = {"steps", "restarts", "generator", "eps", "stats", "seed", "target"}  # set by the evaluator or not for a CLI
SIMPLE = {"int": int, "float": float, "float | None": float, "bool": bool, "str": str, "str | LossFn": str}


def derived_options() -> dict[str, tuple[type, list[str]]]:
    """``{option: (type, [attacks taking it])}`` over every registered attack's keyword-only options of a simple type."""
    found: dict[str, tuple[type, list[str]]] = {}
    for name in ATTACKS:
        for key, p in attack_options(name).items():
            kind = SIMPLE.get(str(p.annotation))
            if key in COMMON or kind is None:
                continue
            found.setdefault(key, (kind, []))[1].append(name)
    return found


def _derived_parameters() -> list[inspect.Parameter]:
    params = []
    for key, (kind, names) in sorted(derived_options().items()):
        flag = "--" + key.replace("_", "-")
        decl = f"{flag}/--no-{key.replace('_', '-')}" if kind is bool else flag
        help_text = f"Option of {', '.join(names)}  [default: the attack's]"
        option = typer.Option(None, decl, help=help_text, show_default=False)
        annotation = bool | None if kind is bool else (int | None if kind is int else str | None)
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def attack_flags(attack: str, given: dict[str, Any]) -> dict[str, Any]:
    """The derived flags given on the command line, checked against ``attack``'s signature and typed."""
    from robustopt.training.config import parse_number

    takes = attack_options(attack)
    out = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in takes:
            valid = ", ".join("--" + k.replace("_", "-") for k in takes if k not in COMMON) or "none"
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to --attack {attack}; its own options: {valid}")
        kind = SIMPLE[str(takes[key].annotation)]
        out[key] = parse_number(value, "--" + key.replace("_", "-")) if kind is float else value
        if kind is int and (out[key] < 1):
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return out


def _print_human(res: dict[str, Any]) -> None:
    where = f", test images {res['start']} to {res['start'] + res['n'] - 1}" if res.get("start") else ""
    typer.echo(f"clean accuracy        {res['clean_accuracy']:.4f}  (n={res['n']}{where})")
    what = "transfer" if res["transfer"] else "white-box"
    typer.echo(f"{res['attack']} {res['norm']} eps={res['eps']:g} ({what})  {res['adversarial_accuracy']:.4f}")
    if "verified_accuracy" in res:
        typer.echo(f"{'verified (' + res['certify_method'] + ')':22s}{res['verified_accuracy']:.4f}  (a guaranteed lower bound; "
                   f"{res['certify_seconds']:.1f} s)")  # fmt: skip
        typer.echo(f"gap                   {res['gap']:.4f}  (attacked minus verified: robust accuracy lies in between)")
    for comp, left in (res.get("components") or {}).items():
        typer.echo(f"  robust after {comp:10s} {left}")
    for name, c in (res.get("sanity") or {}).items():
        typer.echo(f"sanity {name:22s} {'passed' if c['passed'] else 'FAILED'}")
    typer.echo(f"time {res['seconds']:.1f} s")


def _robustbench(res: dict[str, Any], dataset: str | None, model: str) -> dict[str, Any]:
    """The fields of a RobustBench model card: accuracies in percent with two decimals, as RobustBench writes them."""
    from robustopt.evaluation.attacks.autoattack import VERSION
    from robustopt.version import __version__

    return {
        "name": model,
        "dataset": dataset,
        "threat_model": {"linf": "Linf", "l2": "L2", "l1": "L1"}[res["norm"]],
        "eps": f"{res['eps']:g}",
        "clean_acc": f"{100 * res['clean_accuracy']:.2f}",
        "autoattack_acc": f"{100 * res['adversarial_accuracy']:.2f}",
        "n_examples": res["n"],
        "attack": "autoattack",
        "attack_version": VERSION if res.get("standard", True) else "custom",
        "robustopt_version": __version__,
    }


def _check_output_path(path: Path | None, flag: str) -> None:
    """An output file's folder must exist and be writable before an hour of attack, not after."""
    import os

    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write there (a folder, or its folder is missing or read-only)")


def _load(o: dict[str, Any]):
    from robustopt.cli.loaders import load_foreign, load_run

    if (o["run_dir"] is None) == (o["model_spec"] is None):
        raise ConfigError("pass either a run directory or --model package.module:factory with --weights, not both or neither")
    if o["model_spec"] is None and (o["weights"] or o["dataset"] or o["data"] or o["model_kwargs"]):
        raise ConfigError("--weights, --model-kwargs, --dataset and --data go with --model; a run directory knows its own")
    if o["model_spec"] is not None:
        return load_foreign(o["model_spec"], o["model_kwargs"], o["weights"], o["device"], o["dataset"], o["data"],
                            o["subset"], o["data_dir"], o["start"])  # fmt: skip
    return load_run(o["run_dir"], o["device"], o["subset"], o["data_dir"], o["trust_code"], o["start"])


def _threat(o: dict[str, Any], run_cfg: dict[str, Any]):
    """``--norm``/``--eps``, each defaulting to what the run trained against."""
    from robustopt.cli.loaders import run_threat
    from robustopt.threat.model import ThreatModel
    from robustopt.training.config import parse_number

    norm, eps = run_threat(run_cfg)
    norm = o["norm"] or norm or "linf"
    if o["eps"] is not None:
        eps = parse_number(o["eps"], "--eps")
    elif eps is None or norm != run_threat(run_cfg)[0]:
        raise ConfigError("--eps is needed: the model's run records no threat for this norm (e.g. --eps 0.3 or 8/255)")
    return ThreatModel(norm, eps)


def evaluate_command(**o: Any) -> None:
    """Attack a trained model and report clean and adversarial accuracy, with sanity checks."""
    from robustopt.evaluation.attacks import check_attack
    from robustopt.evaluation.attacks.autoattack import is_standard
    from robustopt.evaluation.evaluate import evaluate
    from robustopt.evaluation.report import bounds
    from robustopt.files import write_json

    attack = check_attack(o["attack"])
    if o["sanity"] not in ("light", "full", "off"):
        raise ConfigError(f"--sanity must be light, full or off, got {o['sanity']!r}")
    extra = attack_flags(attack, {k: o[k] for k in derived_options()})
    if o["robustbench_json"] is not None and attack != "autoattack":
        raise ConfigError("--robustbench-json reports an AutoAttack figure; use it with --attack autoattack")
    _check_output_path(o["robustbench_json"], "--robustbench-json")
    loaded = _load(o)
    threat = _threat(o, loaded.config)
    src = None
    if o["source"] is not None:
        src = _source(o, loaded)
    progress = sys.stderr.isatty() if o["progress"] is None else o["progress"]
    sanity = "off" if o["no_sanity"] else o["sanity"]
    kwargs = dict(steps=o["steps"], restarts=o["restarts"], options=extra, batch_size=o["batch_size"], source_model=src,
                  seed=o["seed"], progress=progress, partial_path=o["partial"], sanity=sanity, num_classes=loaded.num_classes,
                  advice="cli")  # fmt: skip
    if o["certify"] is not None:  # the model is checked for the certifier before the attack runs
        res = bounds(loaded.model, loaded.x, loaded.y, threat, attack, certify=o["certify"], flag="--certify", **kwargs)
    else:
        res = evaluate(loaded.model, loaded.x, loaded.y, threat, attack, **kwargs)
    res = res.to_dict()
    as_text = {k: None if o[k] is None else str(o[k]) for k in ("run_dir", "source", "weights")}
    res.update(as_text, model=o["model_spec"], dataset=loaded.data_name, start=o["start"])
    if attack == "autoattack":
        res["standard"] = is_standard(o["steps"] or 100, extra.get("n_targets", 9), extra.get("queries", 5000), 0)
    if o["robustbench_json"] is not None:
        write_json(o["robustbench_json"], _robustbench(res, loaded.data_name, o["model_spec"] or str(o["run_dir"])))
    typer.echo(json.dumps(res, sort_keys=True)) if o["as_json"] else _print_human(res)


def _source(o: dict[str, Any], loaded) -> Any:
    """The transfer source's model, refused (before it is loaded) when it was trained on another data set."""
    from robustopt.errors import RunDirError
    from robustopt.files import read_json
    from robustopt.loading import load_model
    from robustopt.pretrained import resolve_run

    d = resolve_run(o["source"])
    if not d.is_dir():
        raise RunDirError(f"--source {o['source']} does not exist; pass the --out directory of a finished training run")
    cfg = read_json(d / "config.json")
    trained_on = cfg.get("dataset", "mnist") if isinstance(cfg, dict) else None
    if trained_on != loaded.data_name:
        raise ConfigError(f"--source {o['source']} was trained on {trained_on!r} but the evaluation data is "
                          f"{loaded.data_name!r}; pick a source run trained on the same data set")  # fmt: skip
    return load_model(d, loaded.device, trust_code=o["trust_code"])


def _opt(default: Any, *decls: str, **kw: Any) -> Any:
    return typer.Option(default, *decls, **kw)


COMMON_PARAMETERS = {
    "run_dir": (str | None, typer.Argument(None, help="A run directory or pretrained:NAME (or use --model and --weights).")),
    "attack": (str, _opt("pgd", help=" | ".join(ATTACKS))),
    "norm": (str | None, _opt(None, help="linf | l2 | l1  [default: the run's own]")),
    "eps": (str | None, _opt(None, help="Radius ε in pixel units, e.g. 0.3 or 8/255  [default: the run's own]")),
    "steps": (int | None, _opt(None, min=1, help="Attack iterations (queries for square)  [default: per attack]")),
    "restarts": (int, _opt(1, min=1, help="Random restarts (pgd, apgd-ce, auto).")),
    "subset": (int | None, _opt(None, help="Evaluate the first N test images (from --start).")),
    "start": (
        int,
        _opt(
            0,
            help="Skip the first N test images: with --subset M, images [N, N+M) are evaluated, so "
            "processes can split a test set and add their counts.",
        ),
    ),
    "batch_size": (int, _opt(500, min=1, help="Examples per attack batch.")),
    "source": (str | None, _opt(None, "--source", help="Build the examples on this run's model (transfer).")),
    "partial": (Path | None, _opt(None, "--partial", help="Save partial results here and continue from them.")),
    "certify": (
        str | None,
        _opt(
            None,
            "--certify",
            help="ibp | crown-ibp | crown: also certify, and print the verified "
            "accuracy (a lower bound) beside the attacked one (an upper bound) and the gap.",
        ),
    ),
    "sanity": (str, _opt("light", "--sanity", help="light (about a quarter of the attack's cost) | full | off")),
    "no_sanity": (bool, _opt(False, "--no-sanity", help="Skip the gradient-masking sanity checks.")),
    "as_json": (bool, _opt(False, "--json", help="Print one JSON object on stdout.")),
    "robustbench_json": (
        Path | None,
        _opt(
            None, "--robustbench-json", help="With --attack autoattack: write RobustBench's model-card fields to this JSON file."
        ),
    ),
    "model_spec": (str | None, _opt(None, "--model", help="package.module:factory building the architecture.")),
    "model_kwargs": (str | None, _opt(None, "--model-kwargs", help="With --model: the factory's keyword arguments, JSON.")),
    "weights": (
        Path | None,
        _opt(
            None,
            "--weights",
            help="With --model: .safetensors, or a .pt/.pth state dict (read with torch.load(weights_only=True))",
        ),
    ),
    "dataset": (str | None, _opt(None, "--dataset", help="With --model: mnist | fashion-mnist | cifar10 | cifar100.")),
    "data": (Path | None, _opt(None, "--data", help="With --model: a data set file (.npz) or folder.")),
    "data_dir": (Path | None, _opt(None, "--data-dir", help="Where to look for datasets first.")),
    "trust_code": (bool, _opt(False, "--trust-code", help="Allow running the package.module:factory a run directory names.")),
    "device": (str | None, _opt(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]")),
    "seed": (int, _opt(0, help="Seeds random starts and the Square attack.")),
    "progress": (bool | None, _opt(None, "--progress/--no-progress", help="Progress bars on stderr  [default: on a terminal]")),
}


def _signature() -> inspect.Signature:
    params = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD if k == "run_dir" else inspect.Parameter.KEYWORD_ONLY,
                                default=d, annotation=a) for k, (a, d) in COMMON_PARAMETERS.items()]  # fmt: skip
    return inspect.Signature(params + _derived_parameters())


evaluate_command.__signature__ = _signature()  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
