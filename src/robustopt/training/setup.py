"""Run setup: one truth for a run's configuration, checked and built before any file is written.

:func:`resolve_config` merges the caller's arguments into one :class:`TrainConfig` whose threat is the
run's threat (a conflict is an error, never a silent choice); :func:`prepare` validates model, data and
optimiser against it and builds the :class:`Run` that the epoch loop (:mod:`robustopt.training.loop`)
drives; :func:`metadata` is what ``config.json`` records: what actually ran.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
from torch import nn

from robustopt.data.datasets import to_float
from robustopt.data.fingerprint import data_fingerprint
from robustopt.devices import pick_device
from robustopt.errors import ConfigError
from robustopt.rundir import check_out
from robustopt.threat.model import ThreatModel
from robustopt.training import distributed as dist
from robustopt.training.batches import Source, TrainData, as_source, check_source, probe_num_classes
from robustopt.training.checkpoint import Progress
from robustopt.training.config import TrainConfig, make_config
from robustopt.training.ema import WeightAverage
from robustopt.training.extra import fingerprint as extra_fingerprint
from robustopt.training.extra import load_extra
from robustopt.training.monitor import Board, Log
from robustopt.training.objectives import StepContext, make_objective
from robustopt.training.schedules import build_optimizer, check_optimizer
from robustopt.version import __version__

GUARD_N = 500  # held-out training examples of the fast-training guard (Wong et al.)


@dataclass
class Run:
    """Everything one training run holds, built and validated by :func:`prepare` before any file is written."""

    cfg: TrainConfig  # resolved: the threat, augmentation and model as they ran
    out: Path
    info: dist.DistInfo
    device: torch.device
    model: nn.Module  # the plain module (weights, attacks, evaluation)
    ctx: StepContext  # the step: DDP/compiled model, optimiser, objective, generator
    train: Source
    test: Source | None
    held: Source | None  # held-out training examples: per-epoch PGD accuracy and the fast guard
    meta: dict[str, Any]  # config.json
    keys: dict[str, Any]  # what must match for --resume: the training keys and the data's fingerprint
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    base_lrs: list[float] = field(default_factory=list)  # each group's lr before any schedule or resume
    prog: Progress = field(default_factory=Progress)
    log: Log = print
    bar: bool = False
    board: Board | None = None
    extra: Source | None = None  # --extra-data, mixed into every minibatch
    ema: WeightAverage | None = None  # --ema-decay: the weight average, the model of record

    @property
    def augment(self) -> bool:
        return bool(self.cfg.augment)

    @property
    def record(self) -> nn.Module:
        """The model the run saves and evaluates: the weight average when there is one, else the raw model."""
        return self.model if self.ema is None else self.ema.module


def resolve_config(
    config: TrainConfig | None, threat: ThreatModel | None, method: str | None, keywords: dict[str, Any]
) -> tuple[TrainConfig, ThreatModel | None]:
    """One configuration and one threat from ``fit``'s arguments.

    The threat is given once: as ``threat``, or (named configurations) by the config's ``norm``/``eps``.
    Both given and different is an error. Without ``method``: the config's, else ``robust`` when there is
    a threat (a robust-training library does not train non-robustly unless asked), else an error."""
    if threat is not None and not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustopt.ThreatModel, got {type(threat).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a robustopt.TrainConfig, got {type(config).__name__}")
    values = dataclasses.asdict(config) if config is not None else {"model": "custom"}
    values.update({k: v for k, v in keywords.items() if v is not None})
    if method is not None:
        values["method"] = method
    elif config is None:
        values["method"] = "robust" if threat is not None else None
    if values.get("method") is None:
        raise ConfigError("fit needs a threat, fit(model, data, ThreatModel('linf', 0.1)), or method='standard' with threat=None")
    cfg = make_config(values)
    threat = _one_threat(cfg, threat)
    if threat is None and cfg.method != "standard":
        raise ConfigError(f"method {cfg.method!r} needs a threat: fit(model, data, ThreatModel(norm, eps), ...)")
    if threat is not None:
        cfg = dataclasses.replace(cfg, norm=threat.norm, eps=threat.eps, eps_units="pixel")
    return cfg, threat


def _one_threat(cfg: TrainConfig, threat: ThreatModel | None) -> ThreatModel | None:
    if cfg.eps is None and cfg.norm is None:
        return threat
    if threat is None:
        return ThreatModel(cfg.norm or "linf", cfg.pixel_eps)
    if cfg.norm not in (None, threat.norm) or (cfg.eps is not None and abs(cfg.pixel_eps - threat.eps) > 1e-12):
        raise ConfigError(
            f"the config's threat ({cfg.norm} ε={cfg.eps}) differs from threat={threat}: give the threat once, "
            "as threat=ThreatModel(...), and leave TrainConfig's norm and eps unset"
        )
    return threat


def prepare(
    model: nn.Module,
    train_data: TrainData,
    test_data: TrainData | None,
    cfg: TrainConfig,
    threat: ThreatModel | None,
    out: str | Path,
    device: str | None,
    meta: dict[str, Any],
) -> tuple[Run, ThreatModel]:
    """Validate model, data and options and build the run (without optimiser and step). Writes nothing."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = check_out(out)
    info, dev = devices(cfg, device)
    train_src = as_source(train_data, "train_data")
    test_src = as_source(test_data, "test_data") if test_data is not None else None
    model = model.to(dev)
    k = probe_num_classes(model, train_src, dev, meta.get("num_classes"))
    domain = threat or ThreatModel("linf", 0.0)  # standard training: the data must still lie in [0, 1]
    for src, what in ((train_src, "train_data"), (test_src, "test_data")):
        if src is not None:
            check_source(src, domain, k, what)
    input_shape = tuple(train_src.take(torch.arange(1))[0].shape[1:])
    domain.check_fits(input_shape)
    if cfg.method in ("ibp", "crown-ibp") and threat is not None:
        from robustopt.certify.training import check_bounds_apply

        xb, yb = train_src.take(torch.arange(1))
        check_bounds_apply(cfg.method, model, to_float(xb).to(dev), yb.to(dev), threat)
    cfg = dataclasses.replace(cfg, augment=augment_choice(cfg, meta, input_shape))
    fp = fingerprint(train_src, meta)  # of the data as given, before any is held out
    train_src, held = hold_out(cfg, train_src)
    run_meta = metadata(cfg, meta, threat, k, input_shape, dev, info, fp)
    keys = {**cfg.training_keys(), "data_fingerprint": fp}
    run = Run(cfg, out, info, dev, model, None, train_src, test_src, held, run_meta, keys)  # type: ignore[arg-type]
    if cfg.extra_data is not None:
        run.extra = load_extra(cfg.extra_data, input_shape, k, domain)
        keys["extra_data_fingerprint"] = run_meta["train"]["extra_data_fingerprint"] = extra_fingerprint(run.extra)
    return run, domain


def devices(cfg: TrainConfig, device: str | None) -> tuple[dist.DistInfo, torch.device]:
    info = dist.from_env()
    dev = pick_device(device)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with a fixed workspace
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return info, dev


def augment_choice(cfg: TrainConfig, meta: dict[str, Any], input_shape: tuple[int, ...]) -> bool:
    """Crop + flip as asked, else the data's default (on only where it is known to help); never None."""
    augment = bool(meta.get("augment_default", False)) if cfg.augment is None else cfg.augment
    if augment and len(input_shape) != 3:
        raise ConfigError(f"--augment needs image inputs (C, H, W); the data has shape {input_shape}; use --no-augment")
    return augment


def hold_out(cfg: TrainConfig, source: Source) -> tuple[Source, Source | None]:
    """Hold out the last training examples: ``eval_pgd`` for per-epoch PGD accuracy, and for ``fast`` its guard's
    500 (a quarter of the data when there are 1000 or fewer)."""
    if cfg.eval_pgd and len(source) <= 2 * cfg.eval_pgd:
        raise ConfigError(
            f"holding out {cfg.eval_pgd} examples for the per-epoch PGD check needs more than {2 * cfg.eval_pgd} training "
            f"examples, the data has {len(source)}; lower --eval-pgd or use more data"
        )
    n = max(cfg.eval_pgd, guard_size(len(source)) if cfg.method == "fast" else 0)
    return (source, None) if n == 0 else source.split(n)


def guard_size(n: int) -> int:
    """Examples the fast-training guard holds out of n training examples."""
    return GUARD_N if n > 2 * GUARD_N else max(1, n // 4)


def fingerprint(source: Source, meta: dict[str, Any]) -> str:
    """sha256 of the training data (examples and labels), so ``--resume`` can refuse changed data.

    In-memory data is hashed whole by :func:`robustopt.data.fingerprint.data_fingerprint` (about 0.1 s for
    MNIST); a lazy ``Dataset`` by its size, or the fingerprint its caller recorded."""
    if meta.get("data_sha256"):
        return str(meta["data_sha256"])
    if source.x is not None and source.y is not None:
        return str(data_fingerprint((source.x, source.y))["sha256"])
    return f"dataset of {len(source)} examples"


def build_step(cfg: TrainConfig, run: Run, threat: ThreatModel | None, optimizer: torch.optim.Optimizer | None) -> StepContext:
    """The optimiser, generator, DDP/compile wrappers and objective of the run."""
    model, info, dev = run.model, run.info, run.device
    if cfg.channels_last:
        model = run.model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and info.enabled:
        model = run.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if optimizer is None:
        optimizer = build_optimizer(cfg, model)
    check_optimizer(optimizer, model)
    generator = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + info.rank)
    torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # dropout: different per rank, fixed per seed
    outer: nn.Module = model
    if info.enabled:
        dist.setup(info, dev)
        same = {**run.keys, "num_classes": run.meta["num_classes"]}
        same.update(train_data=dist.data_summary(run.train), test_data=dist.data_summary(run.test))  # sizes, for the message
        dist.check_same_config(same)  # before the first collective: ranks started differently would deadlock (issue 16)
        outer = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        outer = torch.compile(outer)
    return context_for(cfg, outer, model, optimizer, threat or ThreatModel("linf", 0.0), generator)


def context_for(
    cfg: TrainConfig,
    outer: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    threat: ThreatModel,
    generator: torch.Generator,
) -> StepContext:
    """The step context of ``cfg``: its objective, AMP mode and options, wired to the given modules."""
    step_size = cfg.step_size if cfg.step_size is not None else (threat.eps if cfg.method == "free" else None)
    objective = make_objective(
        cfg.method,
        threat,
        alpha=cfg.alpha,
        beta=cfg.beta,
        steps=cfg.steps,
        step_size=step_size,
        sigma=cfg.sigma,
        label_smoothing=cfg.label_smoothing,
    )
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type) if cfg.amp == "fp16" else None
    return StepContext(outer, model, optimizer, threat, objective, generator, cfg.replays, amp_dtype, scaler, cfg.grad_clip)


def metadata(
    cfg: TrainConfig,
    meta: dict[str, Any],
    threat: ThreatModel | None,
    k: int,
    input_shape: tuple[int, ...],
    dev: torch.device,
    info: dist.DistInfo,
    data_fingerprint: str,
) -> dict[str, Any]:
    """config.json: what ran. The net (a built-in name, a factory, or ``custom`` for a module handed to ``fit``),
    the data (name or path and content hash), normalisation only where the net applies it, the threat,
    every training argument as resolved (augmentation a bool), versions."""
    return {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": meta.get("dataset", "tensors"),
        "data": {"source": meta.get("dataset", "tensors"), "sha256": data_fingerprint},
        "kind": meta.get("kind", "tensors"),
        "class_names": meta.get("class_names"),
        "num_classes": k,
        "input_shape": list(input_shape),
        "normalization": meta.get("normalization"),
        "threat": None if threat is None else {"norm": threat.norm, "eps": threat.eps, "bounds": list(threat.bounds)},
        "pixel_eps": None if threat is None else threat.eps,
        "train": {**dataclasses.asdict(cfg), "data_fingerprint": data_fingerprint},
        "device": str(dev),
        "world_size": info.world_size,
        "versions": {
            "robustopt": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "safetensors": safetensors.__version__,
        },
    }
