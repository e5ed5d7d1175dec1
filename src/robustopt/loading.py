"""Loading trained models: a run directory (or ``pretrained:NAME``) back into an ``nn.Module``.

A run records its architecture as a built-in name or a ``package.module:factory``. A built-in name
is rebuilt freely; a factory is code, so it is imported and called only with the caller's consent
(``trust_code=True``, CLI ``--trust-code``), as Hugging Face's ``trust_remote_code``: a
``config.json`` from a downloaded directory could otherwise name ``os:system``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustopt.devices import pick_device
from robustopt.errors import RunDirError
from robustopt.files import read_json
from robustopt.models import build, is_factory_spec
from robustopt.pretrained import PREFIX, pretrained_dir, resolve_run
from robustopt.rundir import BEST, CONFIG, MODEL
from robustopt.tensors import load_state_into, load_tensors


def load_model(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    model: nn.Module | None = None,
    weights: str = "model",
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild a trained model from its run directory, in eval mode, taking [0, 1] inputs.

    The architecture is rebuilt from ``config.json``: a built-in net, or the run's
    ``package.module:factory`` (called with its recorded keyword arguments). Pass ``model`` to load
    the weights into a module you built yourself (needed for a module handed to ``fit`` as an
    object). ``weights="best"`` loads ``best.safetensors``, the epoch of best held-out PGD accuracy.
    The returned module plugs straight into torchattacks, AutoAttack or foolbox. ``"pretrained:NAME"`` loads a
    model shipped with robustopt (:mod:`robustopt.pretrained`). ``trust_code=True`` allows calling the
    ``package.module:factory`` a run records (never needed for built-in nets).
    """
    if not isinstance(run_dir, (str, Path)):
        raise RunDirError(f"run_dir must be a run directory path or 'pretrained:NAME', got {type(run_dir).__name__}")
    d = resolve_run(run_dir)
    if not d.is_dir():
        raise RunDirError(f"run directory {d} does not exist")
    if weights not in ("model", "best"):
        raise RunDirError(f"weights must be 'model' or 'best', got {weights!r}")
    path = d / (MODEL if weights == "model" else BEST)
    if weights == "best" and not path.is_file():
        raise RunDirError(f"{d} has no best.safetensors; it is written when training with --eval-pgd N")
    cfg = read_json(d / CONFIG)
    if model is None:
        model = _rebuild(cfg, d, trust_code)
    elif not isinstance(model, nn.Module):
        raise RunDirError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, _ = load_tensors(path)
    load_state_into(model, tensors, path)
    return model.to(pick_device(device)).eval()


def _rebuild(cfg: dict[str, Any], d: Path, trust_code: bool) -> nn.Module:
    """The architecture ``config.json`` names, before its weights are loaded."""
    name = cfg.get("model") if isinstance(cfg, dict) else None
    if name == "custom":
        raise RunDirError(
            f"{d} was trained from a module handed to robustopt.fit; build the same architecture and call "
            "load_model(run_dir, model=MyNet())"
        )
    if not isinstance(name, str):
        raise RunDirError(f"{d / CONFIG} has no model name; retrain the run")
    if is_factory_spec(name):
        if not trust_code:
            raise RunDirError(
                f"{d / CONFIG} names the model factory {name!r}, which is code that would run on this machine; pass "
                "trust_code=True (CLI: --trust-code) only if you trust this run directory, or load_model(run_dir, model=...)"
            )
        kwargs = cfg.get("model_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RunDirError(f"{d / CONFIG}: model_kwargs must be a JSON object, got {kwargs!r}; retrain the run")
        return build(name, kwargs)
    check_model_fields(cfg, d / CONFIG)  # the fields that size a built-in net, before it is built
    norm = cfg["normalization"]
    return build(name, mean=norm["mean"], std=norm["std"], num_classes=cfg["num_classes"], input_shape=tuple(cfg["input_shape"]))


def load_pretrained(name: str, device: str | torch.device = "cpu", *, root: Path | None = None) -> nn.Module:
    """The shipped model ``name`` in eval mode on ``device``: [0, 1] inputs (B, C, H, W) -> logits (B, K).

    ``root`` (default: the package's ``pretrained/``) is where the named run directories live.

        >>> model = load_pretrained("mnist-linf-0.3")   # (B, 1, 28, 28) in [0, 1] -> (B, 10) logits
    """
    return load_model(pretrained_dir(str(name).removeprefix(PREFIX), root), device)


MAX_CLASSES, MAX_CHANNELS, MAX_SIDE, MAX_FEATURES = 100_000, 64, 4096, 10_000_000


def check_model_fields(cfg: Any, path: Path) -> None:
    """Bounds on the fields of a (possibly hand-edited) config.json that size the model, before it is built.

    A huge ``num_classes`` or ``input_shape`` would otherwise try to allocate the weights of a model
    that cannot match any file; a NaN or zero ``std`` would silently produce NaN logits.
    """
    if not isinstance(cfg, dict):
        raise RunDirError(f"{path} is not a JSON object; retrain the run")
    k, shape, norm = cfg.get("num_classes"), cfg.get("input_shape"), cfg.get("normalization")
    if not _is_int(k) or not 1 <= k <= MAX_CLASSES:
        raise RunDirError(f"{path}: num_classes must be a whole number in 1..{MAX_CLASSES}, got {k!r}; retrain the run")
    limits = (MAX_CHANNELS, MAX_SIDE, MAX_SIDE) if isinstance(shape, list) and len(shape) == 3 else (MAX_FEATURES,)
    ok = isinstance(shape, list) and len(shape) == len(limits)
    if not ok or not all(_is_int(v) and 1 <= v <= m for v, m in zip(shape, limits, strict=True)):
        raise RunDirError(
            f"{path}: input_shape must be [C, H, W] with C <= {MAX_CHANNELS} and H, W <= {MAX_SIDE}, or [D] with "
            f"D <= {MAX_FEATURES}, got {shape!r}; retrain the run"
        )
    stats = [norm.get(key) for key in ("mean", "std")] if isinstance(norm, dict) else [None, None]
    if not all(isinstance(v, list) and len(v) in (1, shape[0]) and all(_is_finite(x) for x in v) for v in stats):
        raise RunDirError(f"{path}: normalization needs finite mean and std lists of 1 or {shape[0]} values; retrain the run")
    if min(stats[1]) <= 0:
        raise RunDirError(f"{path}: normalization std must be positive, got {stats[1]}; retrain the run")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
