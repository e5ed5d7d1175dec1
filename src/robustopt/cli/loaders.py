"""What the evaluation commands load: a run directory (or ``pretrained:NAME``), or a foreign model as
``--model package.module:factory --model-kwargs JSON --weights FILE``, and the test images to attack.

Names become objects here, at the edge; :func:`robustopt.evaluate` only ever sees a module and tensors.
Foreign weights are a ``.safetensors`` file or a ``.pt``/``.pth`` state dict read with
``torch.load(weights_only=True)``, PyTorch's restricted loader, which refuses pickled code.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustopt.data.datasets import load_dataset, to_float
from robustopt.data.validation import check_class_count
from robustopt.devices import pick_device
from robustopt.errors import CheckpointError, ConfigError, RunDirError
from robustopt.files import read_json
from robustopt.loading import load_model
from robustopt.models import build
from robustopt.pretrained import PREFIX, resolve_run
from robustopt.rundir import CONFIG
from robustopt.tensors import load_state_into, load_tensors

MAX_WEIGHTS_BYTES = 8 << 30


@dataclass
class Loaded:
    """A model ready to attack and the first test images of its data: x (N, ...) floats in [0, 1], y (N,)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    data_name: str
    num_classes: int | None
    config: dict[str, Any]


def is_run(run_dir: str | Path) -> bool:
    return str(run_dir).startswith(PREFIX) or Path(run_dir).is_dir()


def load_run(run_dir: str | Path, device: str | None, subset: int | None, data_dir: Path | None, trust_code: bool,
             start: int = 0) -> Loaded:  # fmt: skip
    """A run directory's model and ``subset`` test images of its data set from index ``start`` (all when None)."""
    d = resolve_run(run_dir)  # pretrained:NAME is a model shipped with robustopt
    if not d.is_dir():
        raise RunDirError(f"run directory {d} does not exist; pass the --out directory of a finished training run")
    dev = pick_device(device)
    cfg = read_json(d / CONFIG)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("dataset", "mnist"), str):
        raise RunDirError(f"{d / CONFIG} is not a robustopt run configuration")
    model = load_model(d, dev, trust_code=trust_code)
    data = load_dataset(cfg.get("dataset", "mnist"), data_dir)
    k = cfg.get("num_classes")
    if isinstance(k, int):
        check_class_count(data.num_classes, k, where=str(cfg.get("dataset")))
    x, y = test_slice(data, subset, start)
    return Loaded(model, x, y, dev, cfg.get("dataset", "mnist"), k if isinstance(k, int) else None, cfg)


def run_threat(cfg: dict[str, Any]) -> tuple[str | None, float | None]:
    """The (norm, ε in pixels) a run trained against, as its config.json records them (None when it has none)."""
    threat = cfg.get("threat")
    if isinstance(threat, dict) and isinstance(threat.get("norm"), str) and isinstance(threat.get("eps"), (int, float)):
        return threat["norm"], float(threat["eps"])
    return None, None


def test_slice(data: Any, subset: int | None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Test examples ``[start, start + subset)`` (to the end when subset is None) as floats in [0, 1], and their labels.

    ``start`` lets c processes evaluate disjoint ranges side by side (one thread each), which on a CPU finishes
    sooner than one c-thread process; the ranges' counts add up to the whole."""
    if subset is not None and subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {subset}")
    total = len(data.y_test)
    if not 0 <= start < total:
        raise ConfigError(f"--start must be between 0 and {total - 1} (the test set has {total} images), got {start}")
    stop = total if subset is None else min(start + subset, total)
    return to_float(data.x_test[start:stop]), data.y_test[start:stop]


def load_foreign(spec: str, kwargs_json: str | None, weights: Path | None, device: str | None, dataset: str | None,
                 data: Path | None, subset: int | None, data_dir: Path | None, start: int = 0) -> Loaded:  # fmt: skip
    """``--model package.module:factory [--model-kwargs JSON] --weights FILE`` on ``--dataset NAME`` or ``--data PATH``."""
    if weights is None:
        raise ConfigError("--model needs --weights FILE (.safetensors, or a .pt/.pth state dict)")
    if (dataset is None) == (data is None):
        raise ConfigError("--model needs exactly one of --dataset NAME and --data PATH (the test set to evaluate on)")
    dev = pick_device(device)
    data_set = load_dataset(dataset, data_dir) if dataset is not None else load_dataset(str(data))
    x, y = test_slice(data_set, subset, start)
    model = build(spec, model_kwargs(kwargs_json))
    load_state_into(model, read_weights(weights), Path(weights))
    return Loaded(model.to(dev).eval(), x, y, dev, data_set.name, getattr(data_set, "num_classes", None), {})


def model_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs must be a JSON object such as '{{\"width\": 64}}': {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object such as '{{\"width\": 64}}', got {text!r}")
    return value


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: robustopt's own safetensors are hash-checked, anyone else's read as they are;
    ``.pt``/``.pth`` through ``torch.load(weights_only=True)`` (never full unpickling)."""
    try:
        st = Path(path).stat()
    except OSError as e:
        raise CheckpointError(f"--weights {path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"--weights {path} is not a regular file")
    if st.st_size > MAX_WEIGHTS_BYTES:
        raise CheckpointError(f"--weights {path} is {st.st_size} bytes, more than the {MAX_WEIGHTS_BYTES} allowed")
    if Path(path).suffix.lower() in (".pt", ".pth", ".bin"):
        return _torch_state_dict(path)
    return _safetensors(path)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    raw = Path(path).read_bytes()
    if b"content_sha256" in raw[: 8 + 65536]:  # written by robustopt: verify the hash too
        return load_tensors(Path(path))[0]
    try:
        return st_load(raw)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"--weights {path} is not a safetensors file ({e}); pass .safetensors, .pt or .pth") from None


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        msg = f"--weights {path} is not a plain state dict that torch.load(weights_only=True) accepts: {first}"
        raise CheckpointError(msg) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a common checkpoint layout
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"--weights {path} holds {type(obj).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
