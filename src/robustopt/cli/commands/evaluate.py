"""``robustopt evaluate`` and ``robustopt stability``: flags mapped onto :mod:`robustopt.evaluation.evaluate`
and :mod:`robustopt.evaluation.stability`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def _load(run_dir: Path, device: str | None, subset: int | None, data_dir: Path | None):
    """(model, x float (N, C, H, W), y (N,), device, config) for a run's first ``subset`` test images."""
    from robustopt.data.datasets import load_dataset
    from robustopt.devices import pick_device
    from robustopt.errors import RunDirError
    from robustopt.pretrained import resolve_run
    from robustopt.runs import CONFIG, load_model, read_json

    run_dir = resolve_run(run_dir)  # pretrained:NAME is a model shipped with robustopt
    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the --out directory of a finished training run")
    dev = pick_device(device)
    cfg = read_json(Path(run_dir) / CONFIG)
    model = load_model(run_dir, dev)
    x, y = _test_slice(load_dataset(cfg.get("dataset", "mnist"), data_dir), subset)
    return model, x, y, dev, cfg


def _load_source(source: Path, dev, data_name: str):
    """The transfer source's model, refused before loading when it was trained on another data set."""
    from robustopt.errors import ConfigError, RunDirError
    from robustopt.runs import CONFIG, load_model, read_json

    if not Path(source).is_dir():
        raise RunDirError(f"--source {source} does not exist; pass the --out directory of a finished training run")
    trained_on = read_json(Path(source) / CONFIG).get("dataset", "mnist")
    if trained_on != data_name:
        raise ConfigError(f"--source {source} was trained on {trained_on!r} but the evaluation data is {data_name!r}; "
                          "pick a source run trained on the same data set")  # fmt: skip
    return load_model(source, dev)


def _test_slice(data, subset: int | None):
    """The first ``subset`` test images as float (N, C, H, W) in [0, 1], and their labels."""
    from robustopt.data.datasets import to_float
    from robustopt.errors import ConfigError

    if subset is not None and subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {subset}")
    n = len(data.y_test) if subset is None else min(subset, len(data.y_test))
    return to_float(data.x_test[:n]), data.y_test[:n]


def _read_weights(path: Path) -> dict[str, Any]:
    """Tensors of a safetensors file: robustopt's own are hash-checked, anyone else's are read as they are."""
    import stat

    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from robustopt.errors import CheckpointError
    from robustopt.runs import load_tensors

    try:
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise CheckpointError(f"--weights {path}: cannot read it ({e.strerror}); pass a .safetensors file") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"--weights {path} is not a regular file; pass a .safetensors file")
    raw = Path(path).read_bytes()
    if b"content_sha256" in raw[: 8 + 65536]:  # written by robustopt: verify the hash too
        return load_tensors(Path(path))[0]
    try:
        return st_load(raw)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"--weights {path} is not a safetensors file ({e}); convert the weights to safetensors") from None


def _load_factory(spec: str, weights: Path | None, device: str | None, dataset: str | None, data: Path | None,
                  subset: int | None, data_dir: Path | None):  # fmt: skip
    """(model, x, y, device, dataset name, num_classes) for ``--model package.module:factory --weights FILE``."""
    from robustopt.data.datasets import load_dataset
    from robustopt.errors import ConfigError
    from robustopt.models.factory import build_from_spec
    from robustopt.runs import load_state_into
    from robustopt.training.loop import pick_device

    if weights is None:
        raise ConfigError("--model needs --weights FILE.safetensors (the trained weights of that architecture)")
    if (dataset is None) == (data is None):
        raise ConfigError("--model needs exactly one of --dataset NAME and --data PATH (the test set to evaluate on)")
    dev = pick_device(device)
    data_set = load_dataset(dataset, data_dir) if dataset is not None else load_dataset(str(data))
    x, y = _test_slice(data_set, subset)
    model = build_from_spec(spec)
    load_state_into(model, _read_weights(weights), Path(weights))
    return model.to(dev).eval(), x, y, dev, data_set.name, getattr(data_set, "num_classes", None)


def _threat(norm: str, eps: str):
    from robustopt.threat.model import ThreatModel
    from robustopt.training.config import parse_number

    return ThreatModel(norm, parse_number(eps, "--eps"))


def _print_human(res: dict[str, Any]) -> None:
    typer.echo(f"clean accuracy        {res['clean_accuracy']:.4f}  (n={res['n']})")
    what = "transfer" if res["transfer"] else "white-box"
    typer.echo(f"{res['attack']} {res['norm']} eps={res['eps']:g} ({what})  {res['adversarial_accuracy']:.4f}")
    for comp, left in (res.get("components") or {}).items():
        typer.echo(f"  robust after {comp:10s} {left}")
    for name, c in res.get("sanity", {}).items():
        typer.echo(f"sanity {name:22s} {'passed' if c['passed'] else 'FAILED'}")
    typer.echo(f"time {res['seconds']:.1f} s")


def _check_budgets(attack: str, steps: int | None, restarts: int, batch_size: int, targets: int | None, queries: int | None):
    from robustopt.errors import ConfigError

    if restarts < 1 or (steps is not None and steps < 1) or batch_size < 1:
        raise ConfigError("--steps, --restarts and --batch-size must be >= 1")
    if (targets is not None and targets < 1) or (queries is not None and queries < 1):
        raise ConfigError(f"--targets and --queries must be >= 1, got {targets} and {queries}")
    extra = {k: v for k, v in (("n_targets", targets), ("queries", queries)) if v is not None}
    if extra and attack not in ("auto", "autoattack", "apgd-dlr", "fab-t", "square"):
        raise ConfigError("--targets applies to auto, autoattack, apgd-dlr and fab-t; --queries to auto, autoattack and square")
    if "queries" in extra and attack in ("apgd-dlr", "fab-t"):
        raise ConfigError(f"--queries does not apply to --attack {attack}; it sets the Square attack's budget")
    if "n_targets" in extra and attack == "square":
        raise ConfigError("--targets does not apply to --attack square; it sets the targeted attacks' classes")
    if attack == "square" and "queries" in extra:  # square takes its budget as steps
        steps = extra.pop("queries")
    return steps, extra


def _sanity_flag(sanity: str, no_sanity: bool) -> str:
    from robustopt.errors import ConfigError

    if sanity not in ("light", "full", "off"):
        raise ConfigError(f"--sanity must be light, full or off, got {sanity!r}")
    return "off" if no_sanity else sanity


def _robustbench(res: dict[str, Any], dataset: str | None, model: str) -> dict[str, Any]:
    """The fields of a RobustBench model card: accuracies in percent with two decimals, as RobustBench writes them."""
    from robustopt.evaluation.attacks.autoattack import VERSION

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
        "robustopt_version": _version(),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robustopt")
    except PackageNotFoundError:
        return "unknown"


def evaluate_command(
    run_dir: Path | None = typer.Argument(None, help="A finished training run directory (or use --model and --weights)."),
    attack: str = typer.Option("pgd", help="fgsm | fgm | pgd | bim | lbfgs | deepfool | cw | auto | autoattack | apgd-ce | "
                               "apgd-dlr | fab-t | square"),  # fmt: skip
    norm: str = typer.Option("linf", help="linf | l2 | l1"),
    eps: str = typer.Option(..., help="Radius ε in pixel units, e.g. 0.3 or 8/255."),
    steps: int | None = typer.Option(None, help="Attack iterations (queries for square)  [default: per attack]"),
    restarts: int = typer.Option(1, help="Random restarts (pgd, apgd-ce, auto)."),
    subset: int | None = typer.Option(None, help="Evaluate the first N test images."),
    batch_size: int = typer.Option(500, help="Examples per attack batch."),
    source: Path | None = typer.Option(None, "--source", help="Build the examples on this run's model (transfer)."),
    targets: int | None = typer.Option(None, help="auto/autoattack/apgd-dlr/fab-t: target classes  [default: 9]"),
    queries: int | None = typer.Option(None, help="auto/autoattack/square: Square attack queries  [default: 5000]"),
    partial: Path | None = typer.Option(None, "--partial", help="Save partial results here and continue from them."),
    sanity: str = typer.Option("light", "--sanity", help="light (about a quarter of the attack's cost) | full | off"),
    no_sanity: bool = typer.Option(False, "--no-sanity", help="Skip the gradient-masking sanity checks."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    robustbench_json: Path | None = typer.Option(None, "--robustbench-json", help="With --attack autoattack: write "
                                                 "RobustBench's model-card fields to this JSON file."),  # fmt: skip
    model_spec: str | None = typer.Option(None, "--model", help="package.module:factory building the architecture."),
    weights: Path | None = typer.Option(None, "--weights", help="With --model: its weights, a .safetensors file."),
    dataset: str | None = typer.Option(None, "--dataset", help="With --model: mnist | fashion-mnist | cifar10."),
    data: Path | None = typer.Option(None, "--data", help="With --model: a data set file (.npz) or folder."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    seed: int = typer.Option(0, help="Seeds random starts and the Square attack."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Attack a trained model and report clean and adversarial accuracy, with sanity checks."""
    from robustopt.errors import ConfigError
    from robustopt.evaluation.attacks import check_attack
    from robustopt.evaluation.attacks.autoattack import is_standard
    from robustopt.evaluation.evaluate import evaluate
    from robustopt.runs import write_json

    check_attack(attack)
    threat = _threat(norm, eps)
    steps, extra = _check_budgets(attack, steps, restarts, batch_size, targets, queries)
    mode = _sanity_flag(sanity, no_sanity)
    if robustbench_json is not None and attack != "autoattack":
        raise ConfigError("--robustbench-json reports an AutoAttack figure; use it with --attack autoattack")
    if (run_dir is None) == (model_spec is None):
        raise ConfigError("pass either a run directory or --model package.module:factory with --weights, not both or neither")
    if model_spec is None and (weights or dataset or data):
        raise ConfigError("--weights, --dataset and --data go with --model; a run directory knows its own")
    if model_spec is not None:
        model, x, y, dev, data_name, num_classes = _load_factory(model_spec, weights, device, dataset, data, subset, data_dir)
    else:
        model, x, y, dev, cfg = _load(run_dir, device, subset, data_dir)
        data_name, num_classes = cfg.get("dataset", "mnist"), cfg.get("num_classes")
    src = None if source is None else _load_source(source, dev, data_name)
    res = evaluate(model, x, y, attack, threat, steps=steps, restarts=restarts, batch_size=batch_size, source_model=src,
                   seed=seed, progress=progress, partial_path=partial, sanity=mode, attack_kwargs=extra,
                   num_classes=num_classes)  # fmt: skip
    res.pop("robust_mask")
    res.update(run_dir=None if run_dir is None else str(run_dir), source=None if source is None else str(source))
    res.update(model=model_spec, weights=None if weights is None else str(weights), dataset=data_name)
    if attack == "autoattack":
        res["standard"] = is_standard(steps or 100, extra.get("n_targets", 9), extra.get("queries", 5000), 0)
    if robustbench_json is not None:
        write_json(robustbench_json, _robustbench(res, data_name, model_spec or str(run_dir)))
    if as_json:
        typer.echo(json.dumps(res, sort_keys=True))
    else:
        _print_human(res)


def stability_command(
    run_dir: Path = typer.Argument(..., help="A finished training run directory."),
    norm: str = typer.Option("l2", help="linf | l2 | l1"),
    method: str = typer.Option("deepfool", help="deepfool | pgd (binary search over ε)"),
    subset: int | None = typer.Option(1000, help="Use the first N test images."),
    compare: list[Path] = typer.Option([], "--compare", help="Other run directories to measure and overlay."),
    out: Path | None = typer.Option(None, "--out", help="Histogram PNG  [default: RUN_DIR/stability_<norm>_<method>.png]"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where to look for datasets first."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps  [default: auto]"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Minimal adversarial perturbation statistics (median, mean, ρ_adv) and a histogram PNG."""
    from robustopt.evaluation.stability import METHODS, minimal_perturbations, plot_histogram, summary
    from robustopt.threat.model import get_norm

    geom = get_norm(norm)
    _png_path(out, Path(run_dir), norm, method)  # a bad --out fails before any attack runs
    if method not in METHODS:
        from robustopt.errors import ConfigError

        raise ConfigError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    dists, stats = {}, {}
    for rd in [run_dir, *compare]:
        model, x, y, _, _ = _load(rd, device, subset, data_dir)
        d = minimal_perturbations(model, x, y, norm, method, progress=progress)
        dists[str(rd)], stats[str(rd)] = d, summary(d, geom.norm(x))
    png = plot_histogram(dists, _png_path(out, Path(run_dir), norm, method), xlabel=f"minimal {norm} perturbation ({method})")
    if as_json:
        typer.echo(json.dumps({"norm": norm, "method": method, "runs": stats, "histogram": str(png)}, sort_keys=True))
        return
    for rd, s in stats.items():
        line = f"found={s['found_fraction']:.3f} median={s['median']:.4g} mean={s['mean']:.4g} rho_adv={s['rho_adv']:.4g}"
        typer.echo(f"{rd}: n={s['n']} misclassified={s['misclassified']} (not counted) {line}")
    typer.echo(f"histogram {png}")


def _png_path(out: Path | None, run_dir: Path, norm: str, method: str) -> Path:
    """Where the histogram goes: ``--out`` itself if it names a .png, inside it if it is a folder, else the run."""
    from robustopt.errors import ConfigError

    name = f"stability_{norm}_{method}.png"
    if out is None:
        return run_dir / name
    if out.is_dir():
        return out / name
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must be a .png file or an existing folder")
    return out


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
    app.command("stability")(stability_command)
