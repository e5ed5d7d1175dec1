"""``robustopt train``: one flag per :class:`TrainConfig` field, generated from the dataclass.

Each field's name, type, default and help text become an option (``batch_size`` → ``--batch-size``;
booleans get ``--x/--no-x``; numbers accept ``8/255``; lists take ``100,150``; tables take JSON).
``--config FILE.toml`` takes the same keys; flags win. Nothing is restated by hand, so ``--help``
and the config cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import typer

from robustopt.errors import ConfigError
from robustopt.training.config import CONFIG_KEYS, TrainConfig, make_config, read_toml

RUNTIME_KEYS = {"out", "data_dir", "device", "resume", "overwrite"}
HINTS = typing.get_type_hints(TrainConfig)


def _runtime_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Pop the config file's non-training keys (out, data_dir, device, resume, overwrite), type-checked."""
    runtime = {k: values.pop(k) for k in list(values) if k in RUNTIME_KEYS}
    for key, value in runtime.items():
        want = bool if key in ("resume", "overwrite") else str
        if not isinstance(value, want):
            raise ConfigError(f"config key {key} must be {'true or false' if want is bool else 'a string'}, got {value!r}")
    return runtime


def _base_type(hint: Any) -> Any:
    """``int | None`` -> int; ``list[int]`` -> list."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _base_type(args[0])
    return typing.get_origin(hint) or hint


def _option(f: dataclasses.Field) -> inspect.Parameter:
    """A typer option for one config field; its default is None so that only given flags override the TOML."""
    kind = _base_type(HINTS[f.name])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    shown = "none" if default is None else (",".join(map(str, default)) if isinstance(default, list) else default)
    help_text, _, stated = f.metadata.get("help", "").partition(" [default: ")
    shown = json.dumps(default) if isinstance(default, dict) else str(shown)  # typer prints it as [default: ...]
    shown = stated.rstrip("]") or shown  # a default the help spells out, such as "10 for pgd, else 1"
    flag = "--" + f.name.replace("_", "-")
    if kind is bool:
        option = typer.Option(None, f"{flag}/--no-{f.name.replace('_', '-')}", help=help_text, show_default=shown)
        annotation: Any = bool | None
    else:
        option = typer.Option(None, flag, help=help_text, show_default=shown)
        annotation = int | None if kind is int else str | None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _parse_flag(name: str, text: Any) -> Any:
    """Strings from the command line -> the field's type (numbers stay strings: the config parses 8/255)."""
    kind = _base_type(HINTS[name])
    if not isinstance(text, str):
        return text
    if kind is list:
        try:
            return [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be comma-separated whole numbers such as 100,150, got {text!r}"
            ) from None
    if kind is dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{name.replace('_', '-')} must be a JSON object such as '{{\"width\": 64}}': {e}") from None
    return text


def train_command(**kwargs: Any) -> None:
    """Train a classifier by robust optimisation (Algorithm 1 and its relatives) into a run directory."""
    from robustopt.recipes import resolve  # a recipe name or a TOML path
    from robustopt.training.named import train

    config: Path | None = kwargs.pop("config")
    flags = {k: _parse_flag(k, v) for k, v in kwargs.items() if k in CONFIG_KEYS and v is not None}
    values: dict[str, Any] = read_toml(resolve(config), CONFIG_KEYS | RUNTIME_KEYS) if config else {}
    values.update(flags)
    runtime = _runtime_keys(values)
    cfg = make_config(values)
    out = kwargs["out"] if kwargs["out"] is not None else runtime.get("out")
    run_dir = Path(out) if out is not None else Path("runs") / f"{cfg.method}-{cfg.threat_norm}"
    train(
        cfg,
        run_dir,
        data_dir=kwargs["data_dir"] or runtime.get("data_dir"),
        device=kwargs["device"] or runtime.get("device"),
        resume=kwargs["resume"] or bool(runtime.get("resume")),
        overwrite=kwargs["overwrite"] or bool(runtime.get("overwrite")),
        progress=kwargs["progress"],
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(f"saved {run_dir}")


def _signature() -> inspect.Signature:
    kw = inspect.Parameter.KEYWORD_ONLY
    head = [
        inspect.Parameter(
            "config",
            kw,
            annotation=Path | None,
            default=typer.Option(
                None,
                "--config",
                help="TOML file with the same keys as the flags, or a recipe name (robustopt recipes); flags win.",
            ),
        ),
    ]
    tail = [
        inspect.Parameter(
            "out",
            kw,
            annotation=str | None,
            default=typer.Option(None, "--out", help="Run directory", show_default="runs/<method>-<norm>"),
        ),
        inspect.Parameter(
            "data_dir",
            kw,
            annotation=Path | None,
            default=typer.Option(None, "--data-dir", help="Where to look for built-in datasets first."),
        ),
        inspect.Parameter(
            "device",
            kw,
            annotation=str | None,
            default=typer.Option(None, help="auto | cpu | cuda | cuda:N | mps", show_default="auto"),
        ),
        inspect.Parameter(
            "resume", kw, annotation=bool, default=typer.Option(False, "--resume", help="Continue an interrupted run in --out.")
        ),
        inspect.Parameter(
            "overwrite",
            kw,
            annotation=bool,
            default=typer.Option(
                False,
                "--overwrite",
                help="Replace the run in --out. After every check has passed it is set aside, and given back if "
                "the new run ends before finishing an epoch.",
            ),
        ),
        inspect.Parameter(
            "progress",
            kw,
            annotation=bool | None,
            default=typer.Option(None, "--progress/--no-progress", help="Progress bars", show_default="only on a terminal"),
        ),
    ]
    return inspect.Signature(head + [_option(f) for f in dataclasses.fields(TrainConfig)] + tail)


train_command.__signature__ = _signature()  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
