"""Fuzzing the CLI with bad invocations and bad files: a one-line error, a non-zero exit, never a traceback.

Most cases run in-process through :func:`robustopt.cli.app.main` (the console script's entry point) to
keep the file fast; a handful run as real ``python -m robustopt`` subprocesses. Every ``train`` case
targets a finished run directory (half of them with ``--overwrite``) and then checks that its files
are byte-identical: a bad invocation never destroys earlier results.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from _datafiles import tiny_arrays, write_cifar100_bin, write_cifar_bin, write_idx, write_npz
from robustopt import cli
from robustopt.errors import CheckpointError, RobustoptError, RunDirError
from robustopt.loading import load_model
from robustopt.rundir import read_metrics
from robustopt.tensors import load_tensors, save_tensors
from robustopt.training.config import TrainConfig

TRAIN = ["train", "--model", "mlp", "--subset", "300", "--epochs", "1", "--no-progress"]
MODEL_FILE = "model.safetensors"
HALF = [*TRAIN, "--epochs", "2", "--resume"]  # continues the ``half_run`` fixture
RUN_CONFIG = {"model": "mlp", "subset": 300, "epochs": 1}  # what TRAIN means, as TrainConfig fields
CUDA = torch.cuda.is_available()
cli_app = importlib.import_module("robustopt.cli.app")  # the module (``robustopt.cli.app`` is the Typer object)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- helpers


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code if isinstance(code, int) else 1), out, err


def _list_errors() -> ModuleType:
    """scripts/list_errors.py, imported from its path."""
    spec = importlib.util.spec_from_file_location("list_errors", Path(__file__).parents[1] / "scripts" / "list_errors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["list_errors"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _documented_messages() -> list[re.Pattern[str]]:
    """The messages of docs/errors.md, from scripts/list_errors.py, as patterns ({...} matches anything)."""
    module = _list_errors()
    return [re.compile(".*".join(re.escape(p) for p in re.split(r"\{[^{}]*\}", m.text)), re.S) for m in module.collect()]


DOCUMENTED = _documented_messages()


def assert_one_line_error(code: int, err: str, documented: bool = True) -> str:
    """Non-zero exit, no traceback, exactly one ``robustopt: error:`` line on stderr and nothing else.

    With ``documented``, the message must also be one that scripts/list_errors.py extracts from the source.
    """
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustopt: error: "), err
    assert "internal error" not in lines[0]
    message = lines[0].removeprefix("robustopt: error: ")
    assert not documented or any(t.fullmatch(message) for t in DOCUMENTED), f"not in docs/errors.md: {message}"
    return lines[0]


def assert_usage_error(code: int, err: str) -> None:
    """Click's own usage error (bad flag syntax): exit 2, an error box, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err and "Error" in err, err


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user cache, no $ROBUSTOPT_DATA, no debug mode, and a scratch working directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTOPT_DATA", raising=False)
    monkeypatch.delenv("ROBUSTOPT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A real finished 1-epoch mlp run on 300 MNIST images, and a snapshot of its files."""
    from robustopt.training.named import train

    run = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(**RUN_CONFIG), run, progress=False, log=lambda s: None)
    return run, snapshot(run)


@pytest.fixture
def finished_run(pristine_run: tuple[Path, dict[str, bytes]]) -> tuple[Path, dict[str, bytes]]:
    """The finished run, restored from its snapshot before each test: one destructive case cannot spoil the next."""
    run, files = pristine_run
    if run.is_dir():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (run / name).write_bytes(data)
    return run, files


@pytest.fixture
def unfinished_run(finished_run: tuple[Path, dict[str, bytes]], tmp_path: Path) -> Path:
    """A copy of the finished run whose summary is gone: ``--resume`` will read its checkpoint."""
    run = tmp_path / "unfinished"
    shutil.copytree(finished_run[0], run)
    (run / "summary.json").unlink()
    return run


@pytest.fixture
def half_run(finished_run: tuple[Path, dict[str, bytes]], tmp_path: Path) -> Path:
    """A 2-epoch run stopped after epoch 1: ``HALF`` resumes it and really trains epoch 2 from its checkpoint."""
    run = tmp_path / "half"
    shutil.copytree(finished_run[0], run)
    (run / "summary.json").unlink()
    _edit_json(run / "config.json", lambda c: c["train"].update(epochs=2))
    return run


def check_untouched(finished_run: tuple[Path, dict[str, bytes]]) -> None:
    run, before = finished_run
    assert snapshot(run) == before, "a failed invocation changed a finished run directory"


# ---------------------------------------------------------------- bad flags

BAD_FLAGS: dict[str, list[str]] = {
    "unknown-dataset": ["--dataset", "imagenet"],
    "unknown-model": ["--model", "vgg"],
    "unknown-method": ["--method", "madry"],
    "unknown-norm": ["--norm", "l3"],
    "empty-norm": ["--norm", ""],
    "unknown-schedule": ["--schedule", "triangle"],
    "unknown-amp": ["--amp", "fp8"],
    "unknown-eps-units": ["--eps-units", "furlongs"],
    "unknown-device": ["--device", "tpu"],
    "eps-negative": ["--eps", "-0.1"],
    "eps-nan": ["--eps", "nan"],
    "eps-inf": ["--eps", "inf"],
    "eps-minus-inf": ["--eps", "-inf"],
    "eps-overflow": ["--eps", "1e400"],
    "eps-garbage": ["--eps", "abc"],
    "eps-empty": ["--eps", ""],
    "eps-div-zero": ["--eps", "1/0"],
    "eps-double-fraction": ["--eps", "8/255/3"],
    "eps-zero-robust": ["--eps", "0"],
    "step-size-zero": ["--step-size", "0"],
    "step-size-negative": ["--step-size", "-0.01"],
    "step-size-nan": ["--step-size", "nan"],
    "step-size-inf": ["--step-size", "inf"],
    "step-size-garbage": ["--step-size", "x"],
    "lr-zero": ["--lr", "0"],
    "lr-negative": ["--lr", "-0.01"],
    "lr-nan": ["--lr", "nan"],
    "lr-inf": ["--lr", "inf"],
    "lr-garbage": ["--lr", "fast"],
    "epochs-zero": ["--epochs", "0"],
    "epochs-negative": ["--epochs", "-3"],
    "batch-size-zero": ["--batch-size", "0"],
    "batch-size-negative": ["--batch-size", "-10"],
    "momentum-above-one": ["--momentum", "1.5"],
    "weight-decay-negative": ["--weight-decay", "-1e-3"],
    "alpha-above-one": ["--alpha", "2"],
    "alpha-nan": ["--alpha", "nan"],
    "checkpoint-minutes-zero": ["--checkpoint-minutes", "0"],
    "checkpoint-minutes-nan": ["--checkpoint-minutes", "nan"],
    "steps-zero": ["--steps", "0"],
    "replays-zero": ["--method", "free", "--replays", "0"],
    "subset-zero": ["--subset", "0"],
    "subset-too-large": ["--subset", "1000000"],
    "seed-negative": ["--seed", "-1"],
    "lr-step-zero": ["--lr-step", "0"],
    "eps-above-linf-domain": ["--norm", "linf", "--eps", "1.5"],
    "eps-above-l2-domain": ["--norm", "l2", "--eps", "30"],  # the l2 diameter of [0,1]^784 is 28
    "eps-above-l1-domain": ["--norm", "l1", "--eps", "800"],  # the l1 diameter is 784
    "eps-standardized-above-domain": ["--eps-units", "standardized", "--eps", "4"],  # 4·0.3081 > 1
    "eval-pgd-too-many": ["--eval-pgd", "200"],  # 300 images: holding out 200 leaves too few to train on
    "device-meta": ["--device", "meta"],
    "device-xla": ["--device", "xla"],
    "device-cpu-index": ["--device", "cpu:1"],
    "device-uppercase": ["--device", "CUDA"],
    "seed-too-large-for-rng": ["--seed", "99999999999999999999"],
    "model-for-other-data": ["--model", "paper-cifar"],  # 32×32 net on MNIST: checked before anything is replaced
    "out-empty-data-dir": ["--data-dir", ""],
}
if not CUDA:
    BAD_FLAGS["device-cuda-without-cuda"] = ["--device", "cuda"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["keep", "overwrite"])
@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags(case: str, overwrite: bool, finished_run: tuple[Path, dict[str, bytes]], capsys) -> None:
    argv = TRAIN + BAD_FLAGS[case] + ["--out", finished_run[0]] + (["--overwrite"] if overwrite else [])
    assert_one_line_error(*run_main(argv, capsys)[::2])
    check_untouched(finished_run)


def test_bad_flags_name_the_problem(capsys) -> None:
    """The message says which option is wrong and, for choices, what the valid ones are."""
    line = assert_one_line_error(*run_main([*TRAIN, "--norm", "l3"], capsys)[::2])
    assert "norm" in line and "'l3'" in line and "linf" in line
    line = assert_one_line_error(*run_main([*TRAIN, "--lr", "nan"], capsys)[::2])
    assert "--lr" in line and "finite" in line
    line = assert_one_line_error(*run_main([*TRAIN, "--norm", "l2", "--eps", "30"], capsys)[::2])
    assert "28" in line and "eps" in line  # the l2 diameter of the domain


USAGE_ERRORS: dict[str, list[str]] = {
    "epochs-not-int": [*TRAIN, "--epochs", "abc"],
    "batch-size-float": [*TRAIN, "--batch-size", "1.5"],
    "unknown-flag": [*TRAIN, "--bogus"],
    "flag-without-value": [*TRAIN, "--eps"],
    "unknown-command": ["frobnicate"],
    "download-without-name": ["download"],
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors(case: str, capsys) -> None:
    code, _, err = run_main(USAGE_ERRORS[case], capsys)
    assert_usage_error(code, err)


def test_download_unknown_name(tmp_path: Path, capsys) -> None:
    line = assert_one_line_error(*run_main(["download", "imagenet", "--dest", tmp_path / "d"], capsys)[::2])
    assert "imagenet" in line and "cifar10" in line
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- bad dataset files

Writer = Callable[[Path], None]


def _npz(name: str, **changes: np.ndarray | None) -> Writer:
    def write(d: Path) -> None:
        arrays = tiny_arrays((32, 32, 3) if name == "cifar10" else (28, 28))
        arrays.update({k: v for k, v in changes.items() if v is not None})
        for k in [k for k, v in changes.items() if v is None]:
            del arrays[k]
        write_npz(d / f"{name}.npz", arrays)

    return write


def _truncated_npz(d: Path) -> None:
    path = write_npz(d / "fashion-mnist.npz", tiny_arrays())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _idx(mutate: Callable[[dict[str, Path]], None], gz: bool = True) -> Writer:
    def write(d: Path) -> None:
        mutate(write_idx(d / "fashion-mnist", tiny_arrays(), gz=gz))

    return write


def _cifar(mutate: Callable[[Path], None]) -> Writer:
    def write(d: Path) -> None:
        mutate(write_cifar_bin(d / "cifar-10-batches-bin", tiny_arrays((32, 32, 3))))

    return write


def _truncate(p: Path, keep: int | None = None) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2 if keep is None else keep])


def _labels_idx(value: int) -> Callable[[dict[str, Path]], None]:
    def mutate(paths: dict[str, Path]) -> None:
        raw = bytearray(gzip.decompress(paths["y_train"].read_bytes()))
        raw[-1] = value
        paths["y_train"].write_bytes(gzip.compress(bytes(raw)))

    return mutate


def _replace(key: str, content: bytes) -> Callable[[dict[str, Path]], None]:
    return lambda paths: paths[key].write_bytes(content)


def _idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def _lying_npz(path: Path, shape: tuple[int, ...]) -> None:
    """A valid tiny npz whose x_train header then declares ``shape`` (the member's bytes stay the same)."""
    arrays = tiny_arrays()
    write_npz(path, arrays)
    raw = path.read_bytes()
    i = raw.index(repr(arrays["x_train"].shape).encode())
    end = raw.index(b"\n", i)  # the header ends in spaces and a newline: keep its length
    edited = raw[i:end].replace(repr(arrays["x_train"].shape).encode(), repr(shape).encode(), 1).rstrip(b" ")
    assert len(edited) <= end - i
    path.write_bytes(raw[:i] + edited.ljust(end - i) + raw[end:])


rng = np.random.default_rng(1)
nan_pixels = rng.random((30, 28, 28))
nan_pixels[3, 4, 5] = np.nan

BAD_DATA: dict[str, tuple[str, Writer]] = {
    "npz-truncated": ("fashion-mnist", _truncated_npz),
    "npz-garbage": ("fashion-mnist", lambda d: (d / "fashion-mnist.npz").write_bytes(os.urandom(2000))),
    "npz-empty-file": ("fashion-mnist", lambda d: (d / "fashion-mnist.npz").write_bytes(b"")),
    "npz-missing-array": ("fashion-mnist", _npz("fashion-mnist", y_test=None)),
    "npz-wrong-shape": ("fashion-mnist", _npz("fashion-mnist", x_train=np.zeros((30, 27, 27), np.uint8))),
    "npz-wrong-rank": ("fashion-mnist", _npz("fashion-mnist", x_train=np.zeros((30, 784), np.uint8))),
    "npz-label-too-large": ("fashion-mnist", _npz("fashion-mnist", y_train=np.full(30, 10))),
    "npz-label-negative": ("fashion-mnist", _npz("fashion-mnist", y_test=np.full(20, -1))),
    "npz-label-float": ("fashion-mnist", _npz("fashion-mnist", y_train=np.zeros(30))),
    "npz-label-count": ("fashion-mnist", _npz("fashion-mnist", y_train=np.zeros(29, np.int64))),
    "npz-nan-pixels": ("fashion-mnist", _npz("fashion-mnist", x_train=nan_pixels)),
    "npz-pixels-above-one": ("fashion-mnist", _npz("fashion-mnist", x_test=np.full((20, 28, 28), 255.0))),
    "npz-int32-pixels": ("fashion-mnist", _npz("fashion-mnist", x_train=np.zeros((30, 28, 28), np.int32))),
    "npz-empty-split": ("fashion-mnist", _npz("fashion-mnist", x_test=np.zeros((0, 28, 28), np.uint8))),
    "npz-pickled-object": ("fashion-mnist", _npz("fashion-mnist", y_train=np.array([{"a": 1}] * 30, dtype=object))),
    "npz-mnist-override-corrupt": ("mnist", lambda d: (d / "mnist.npz").write_bytes(b"PK\x03\x04broken")),
    "npz-cifar-grayscale": ("cifar10", _npz("cifar10", x_train=np.zeros((30, 28, 28), np.uint8))),
    "idx-gz-truncated": ("fashion-mnist", _idx(lambda p: _truncate(p["x_train"]))),
    "idx-gz-not-gzip": ("fashion-mnist", _idx(lambda p: p["x_test"].write_bytes(b"not gzip at all"))),
    "idx-raw-truncated": ("fashion-mnist", _idx(lambda p: _truncate(p["x_train"]), gz=False)),
    "idx-raw-header-only": ("fashion-mnist", _idx(lambda p: _truncate(p["y_test"], keep=6), gz=False)),
    "idx-bad-magic": ("fashion-mnist", _idx(lambda p: p["y_test"].write_bytes(b"\x08\x08\x08\x01" + bytes(24)), gz=False)),
    "idx-label-out-of-range": ("fashion-mnist", _idx(_labels_idx(200))),
    "idx-count-mismatch": (
        "fashion-mnist",
        _idx(lambda p: p["y_train"].write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])))),
    ),
    "cifar-bin-bad-size": ("cifar10", _cifar(lambda d: _truncate(d / "data_batch_2.bin", keep=3073 * 2 + 100))),
    "cifar-bin-empty": ("cifar10", _cifar(lambda d: (d / "test_batch.bin").write_bytes(b""))),
    "cifar-bin-missing-batch": ("cifar10", _cifar(lambda d: (d / "data_batch_3.bin").unlink())),
    "cifar-bin-batch-is-dir": (
        "cifar10",
        _cifar(lambda d: ((d / "data_batch_4.bin").unlink(), (d / "data_batch_4.bin").mkdir())),
    ),
    "cifar-missing": ("cifar10", lambda d: None),
    "npz-is-npy": ("fashion-mnist", lambda d: np.save(open(d / "fashion-mnist.npz", "wb"), np.zeros((3, 28, 28), np.uint8))),
    "npz-declares-1e9-images": ("fashion-mnist", lambda d: _lying_npz(d / "fashion-mnist.npz", (10**9, 28, 28))),
    "npz-declares-negative-size": ("fashion-mnist", lambda d: _lying_npz(d / "fashion-mnist.npz", (-5, 28, 28))),
    "npz-declares-overflowing-size": ("fashion-mnist", lambda d: _lying_npz(d / "fashion-mnist.npz", (2**40, 2**40, 2**40))),
    "npz-is-a-directory": ("fashion-mnist", lambda d: (d / "fashion-mnist.npz").mkdir()),
    "npz-label-bool": ("fashion-mnist", _npz("fashion-mnist", y_train=np.zeros(30, bool))),
    "npz-complex-pixels": ("fashion-mnist", _npz("fashion-mnist", x_train=np.zeros((30, 28, 28), np.complex64))),
    "npz-0d-images": ("fashion-mnist", _npz("fashion-mnist", x_test=np.array(3.0))),
    "npz-structured-labels": ("fashion-mnist", _npz("fashion-mnist", y_test=np.zeros(20, [("a", "i4")]))),
    "idx-dimension-overflow": ("fashion-mnist", _idx(_replace("y_train", _idx_header(*[2**32 - 1] * 4) + bytes(1024)), gz=False)),
    "idx-dimension-overflow-gz": ("fashion-mnist", _idx(_replace("x_test", gzip.compress(_idx_header(*[2**32 - 1] * 4))))),
    "idx-1e9-images": ("fashion-mnist", _idx(_replace("x_train", gzip.compress(_idx_header(10**9, 28, 28) + bytes(784))))),
    "idx-zero-dimensions": ("fashion-mnist", _idx(_replace("y_test", _idx_header() + b"\x05"), gz=False)),
    "idx-trailing-bytes": ("fashion-mnist", _idx(lambda p: p["y_test"].write_bytes(p["y_test"].read_bytes() + b"xx"), gz=False)),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_dataset_files(case: str, tmp_path: Path, finished_run: tuple[Path, dict[str, bytes]], capsys) -> None:
    dataset, write = BAD_DATA[case]
    data = tmp_path / "data"
    data.mkdir()
    write(data)
    argv = [*TRAIN, "--dataset", dataset, "--data-dir", data, "--out", finished_run[0], "--overwrite"]
    assert_one_line_error(*run_main(argv, capsys)[::2])
    check_untouched(finished_run)


MODEL_DATA_MISMATCH = {  # paper-mnist takes any C×H×W up to 32×32 and resnet18 any image size: not mismatches
    "paper-cifar-on-28x28": ("fashion-mnist", "paper-cifar"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DATA_MISMATCH))
def test_model_data_mismatch(case: str, tmp_path: Path, capsys) -> None:
    dataset, model = MODEL_DATA_MISMATCH[case]
    _npz(dataset)(tmp_path)  # a valid tiny dataset of the other shape
    argv = [*TRAIN, "--dataset", dataset, "--data-dir", tmp_path, "--model", model, "--subset", "30", "--out", tmp_path / "run"]
    line = assert_one_line_error(*run_main(argv, capsys)[::2])
    assert model in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- bad checkpoints and run directories


def _flip(offset_from_end: int) -> Callable[[Path], None]:
    def tamper(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        raw[-offset_from_end] ^= 0xFF
        p.write_bytes(bytes(raw))

    return tamper


def _flip_header(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[12] ^= 0xFF  # inside the JSON header
    p.write_bytes(bytes(raw))


def _edit_hash(p: Path) -> None:
    raw = p.read_bytes()
    i = raw.index(b"content_sha256") + len(b'content_sha256":"')
    digit = b"0" if raw[i : i + 1] != b"0" else b"1"
    p.write_bytes(raw[:i] + digit + raw[i + 1 :])  # same length: a well-formed file with a wrong hash


def _no_hash(p: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(p))


def _incomplete(p: Path) -> None:
    save_tensors(p, {"w": torch.zeros(3)}, {"unrelated": 1})  # valid hash, but not a training checkpoint


def _as_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _edit_checkpoint(edit: Callable[[dict, dict], object]) -> Callable[[Path], None]:
    """A hand edit that keeps the file well formed and its content hash valid (re-saved by robustopt's own writer)."""

    def tamper(p: Path) -> None:
        tensors, meta = load_tensors(p)
        edit(meta, tensors)
        save_tensors(p, tensors, meta)

    return tamper


def _huge_header(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes((2**60).to_bytes(8, "little") + raw[8:])


def _rename_key(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


BAD_CHECKPOINTS: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate,
    "truncated-to-8-bytes": lambda p: _truncate(p, keep=8),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "flipped-last-byte": _flip(1),
    "flipped-data-byte": _flip(5000),
    "flipped-header-byte": _flip_header,
    "hash-edited": _edit_hash,
    "no-content-hash": _no_hash,
    "not-a-training-checkpoint": _incomplete,
    "is-a-directory": _as_dir,
    "header-length-2-to-the-60": _huge_header,
    "edited-metadata-not-an-object": lambda p: save_tensors(p, load_tensors(p)[0], [1, 2]),  # type: ignore[arg-type]
    "edited-progress-epoch-string": _edit_checkpoint(lambda m, t: m["progress"].update(epoch="one")),
    "edited-progress-epoch-negative": _edit_checkpoint(lambda m, t: m["progress"].update(epoch=-3)),
    "edited-progress-batch-past-epoch": _edit_checkpoint(lambda m, t: m["progress"].update(batch=10**6, seen=5.0)),
    "edited-progress-seen-nan": _edit_checkpoint(lambda m, t: m["progress"].update(batch=1, seen=float("nan"))),
    "edited-progress-unknown-field": _edit_checkpoint(lambda m, t: m["progress"].update(bogus=1)),
    "edited-progress-not-an-object": _edit_checkpoint(lambda m, t: m.update(progress=[1])),
    "edited-history-rows": _edit_checkpoint(lambda m, t: m["progress"].update(history=[1])),
    "edited-history-seconds-string": _edit_checkpoint(lambda m, t: m["progress"]["history"][0].update(seconds="x")),
    "edited-extra-stopped-string": _edit_checkpoint(lambda m, t: m["progress"].update(extra={"stopped": "yes"})),
    "edited-momentum-string": _edit_checkpoint(lambda m, t: m["optimizer"]["param_groups"][0].update(momentum="x")),
    "edited-lr-string": _edit_checkpoint(lambda m, t: m["optimizer"]["param_groups"][0].update(lr="fast")),
    "edited-param-groups-empty": _edit_checkpoint(lambda m, t: m["optimizer"].update(param_groups=[])),
    "edited-param-groups-params": _edit_checkpoint(lambda m, t: m["optimizer"]["param_groups"][0].update(params=[0, 99])),
    "edited-optimizer-scalars-list": _edit_checkpoint(lambda m, t: m["optimizer"].update(scalars=[1])),
    "edited-optimizer-scalar-string": _edit_checkpoint(lambda m, t: m["optimizer"].update(scalars={"0.step": "x"})),
    "edited-optimizer-missing": _edit_checkpoint(lambda m, t: m.pop("optimizer")),
    "edited-momentum-buffer-shape": _edit_checkpoint(lambda m, t: t.update({"optim.0.momentum_buffer": torch.zeros(3)})),
    "edited-optimizer-unknown-param": _edit_checkpoint(lambda m, t: _rename_key(t, "optim.0.momentum_buffer", "optim.99.m")),
    "edited-optimizer-state-bad-key": _edit_checkpoint(lambda m, t: _rename_key(t, "optim.0.momentum_buffer", "optim.x.m")),
    "edited-rng-cpu-size": _edit_checkpoint(lambda m, t: t.update({"rng.cpu": torch.zeros(10, dtype=torch.uint8)})),
    "edited-rng-attack-dtype": _edit_checkpoint(lambda m, t: t.update({"rng.attack": torch.zeros(5056)})),
    "edited-rng-attack-missing": _edit_checkpoint(lambda m, t: t.pop("rng.attack")),
    "edited-model-tensor-shape": _edit_checkpoint(lambda m, t: t.update({"model.net.1.weight": torch.zeros(3, 3)})),
    "edited-model-extra-tensor": _edit_checkpoint(lambda m, t: t.update({"model.bogus": torch.zeros(3)})),
    "edited-method-state-nan": _edit_checkpoint(lambda m, t: t.update({"method.free_delta": torch.full((2,), float("nan"))})),
    "edited-method-best-shape": _edit_checkpoint(lambda m, t: t.update({"method.best.net.1.weight": torch.zeros(2)})),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_resume_bad_checkpoint(case: str, half_run: Path, capsys) -> None:
    BAD_CHECKPOINTS[case](half_run / "checkpoint.safetensors")
    before = snapshot(half_run)
    line = assert_one_line_error(*run_main([*HALF, "--out", half_run], capsys)[::2])
    assert "checkpoint.safetensors" in line
    assert snapshot(half_run) == before


def test_resume_good_checkpoint(half_run: Path, capsys) -> None:
    """The control for the cases above: the untampered half run resumes, trains epoch 2 and finishes."""
    code, _, err = run_main([*HALF, "--out", half_run], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(half_run)] == [1, 2] and (half_run / "summary.json").exists()


def test_state_dict_mismatch_names_the_keys(half_run: Path, capsys) -> None:
    _edit_checkpoint(lambda m, t: t.update({"model.net.1.weight": torch.zeros(3, 3), "model.bogus": torch.zeros(1)}))(
        half_run / "checkpoint.safetensors"
    )
    line = assert_one_line_error(*run_main([*HALF, "--out", half_run], capsys)[::2])
    assert "net.1.weight (3, 3)" in line and "bogus" in line


RUN_DIR_CONFLICTS: dict[str, tuple[list[str], Callable[[Path], None]]] = {
    "resume-other-config": (["--resume", "--lr", "0.5"], lambda d: None),
    "resume-other-seed": (["--resume", "--seed", "7"], lambda d: None),
    "unfinished-without-resume": ([], lambda d: None),
    "resume-corrupt-config-json": (["--resume"], lambda d: (d / "config.json").write_text("{not json")),
    "resume-config-json-not-utf8": (["--resume"], lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00")),
    "resume-config-json-a-list": (["--resume"], lambda d: (d / "config.json").write_text("[1, 2]")),
    "resume-config-json-train-a-string": (["--resume"], lambda d: _edit_json(d / "config.json", lambda c: c.update(train="x"))),
    "overwrite-config-json-not-a-run": (["--overwrite"], lambda d: (d / "config.json").write_text('{"name": "my notes"}')),
    "resume-config-json-is-a-directory": (["--resume"], lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir())),
}


@pytest.mark.parametrize("case", sorted(RUN_DIR_CONFLICTS))
def test_run_dir_conflicts(case: str, unfinished_run: Path, capsys) -> None:
    flags, prepare = RUN_DIR_CONFLICTS[case]
    prepare(unfinished_run)
    before = snapshot(unfinished_run)
    assert_one_line_error(*run_main([*TRAIN, "--out", unfinished_run, *flags], capsys)[::2])
    assert snapshot(unfinished_run) == before


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--resume", "--lr", "0.5"]], ids=["plain", "resume", "resume-other"])
def test_finished_run_is_kept(flags: list[str], finished_run: tuple[Path, dict[str, bytes]], capsys) -> None:
    line = assert_one_line_error(*run_main([*TRAIN, "--out", finished_run[0], *flags], capsys)[::2])
    assert "finished" in line and "--overwrite" in line
    check_untouched(finished_run)


def test_overwrite_keeps_other_programs_files(tmp_path: Path, capsys) -> None:
    """A directory whose config.json is not a robustopt run is never emptied, even with --overwrite."""
    d = tmp_path / "project"
    d.mkdir()
    (d / "config.json").write_text('{"theirs": true}')
    (d / "model.safetensors").write_bytes(b"their weights")
    before = snapshot(d)
    line = assert_one_line_error(*run_main([*TRAIN, "--out", d, "--overwrite"], capsys)[::2])
    assert "not a robustopt run" in line
    assert snapshot(d) == before


@pytest.mark.parametrize("damage", ["corrupt-json", "not-utf8", "empty"])
def test_overwrite_replaces_a_damaged_run(damage: str, unfinished_run: Path, capsys) -> None:
    """The corrupt-config message advises --overwrite, so --overwrite must work on a damaged run of ours."""
    content = {"corrupt-json": b"{not json", "not-utf8": b"\xff\xfe", "empty": b""}[damage]
    (unfinished_run / "config.json").write_bytes(content)
    code, _, err = run_main([*TRAIN, "--out", unfinished_run, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((unfinished_run / "config.json").read_text())["train"]["model"] == "mlp"
    assert (unfinished_run / "summary.json").exists()


BAD_OUT: dict[str, list[str]] = {
    "empty": ["--out", ""],
    "empty-equals": ["--out="],
    "blank": ["--out", "  "],
    "under-a-file": ["--out", "notes.txt/run"],
    "a-file": ["--out", "notes.txt"],
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["keep", "overwrite"])
@pytest.mark.parametrize("case", sorted(BAD_OUT))
def test_bad_out(case: str, overwrite: bool, tmp_path: Path, capsys) -> None:
    """``--out ""`` would train into (and with --overwrite delete from) the current directory."""
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "config.json").write_text("{}")  # the cwd (tmp_path) is no run: nothing here may change
    before = snapshot(tmp_path)
    argv = [*TRAIN, *BAD_OUT[case], *(["--overwrite"] if overwrite else [])]
    assert_one_line_error(*run_main(argv, capsys)[::2], documented=case != "under-a-file")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]


def test_out_from_config_file_with_nul(tmp_path: Path, capsys) -> None:
    (tmp_path / "cfg.toml").write_text('out = "a\\u0000b"\n')
    assert_one_line_error(*run_main([*TRAIN, "--config", tmp_path / "cfg.toml"], capsys)[::2])


def test_out_is_a_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "results.txt"
    target.write_text("precious")
    assert_one_line_error(*run_main([*TRAIN, "--out", target, "--overwrite"], capsys)[::2])
    assert target.read_text() == "precious"


# ---------------------------------------------------------------- special files: a FIFO must not hang, /dev/zero not eat memory


class Hung(BaseException):
    """Not an Exception: the CLI's handlers must not turn a hang into an ordinary error line."""


@contextmanager
def guarded(seconds: int = 20, extra_bytes: int = 2 << 30) -> Iterator[None]:
    """Fail (not hang, not exhaust the machine) if the code under test blocks or reads without bound.

    SIGALRM interrupts a blocking open()/read() of a FIFO; a cap on the address space turns an
    unbounded read of /dev/zero into a MemoryError. Neither fires when robustopt behaves.
    """

    def timeout(signum: int, frame: object) -> None:
        raise Hung(f"blocked for {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    previous = signal.signal(signal.SIGALRM, timeout)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra_bytes, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def _fifo(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to("/dev/zero")


SPECIAL: dict[str, Callable[[Path], None]] = {"fifo": _fifo, "dev-zero": _dev_zero}
EVALUATE = ["evaluate", "--eps", "0.1", "--attack", "fgsm", "--subset", "5", "--no-sanity", "--no-progress", "--device", "cpu"]


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX special files")
@pytest.mark.parametrize("special", sorted(SPECIAL))
@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "checkpoint.safetensors"])
def test_special_run_files(target: str, special: str, half_run: Path, capsys) -> None:
    """A run file replaced by a FIFO or a /dev/zero symlink: one line, exit 2, for evaluate and for --resume."""
    SPECIAL[special](half_run / target)
    readers = {"model.safetensors": ["evaluate"], "config.json": ["evaluate", "train"], "checkpoint.safetensors": ["train"]}
    for argv in ([EVALUATE[0], half_run, *EVALUATE[1:]], [*HALF, "--out", half_run]):
        if argv[0] not in readers[target]:
            continue  # train --resume rewrites model.safetensors without reading it; evaluate ignores the checkpoint
        with guarded():
            code, _, err = run_main(argv, capsys)
        line = assert_one_line_error(code, err)
        assert code == 2 and target in line


SPECIAL_DATA: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "npz": ("fashion-mnist", lambda d: d / "fashion-mnist.npz"),
    "idx": ("fashion-mnist", lambda d: write_idx(d / "fashion-mnist", tiny_arrays(), gz=True)["x_test"]),
    "cifar-bin": ("cifar10", lambda d: write_cifar_bin(d / "cifar-10-batches-bin", tiny_arrays((32, 32, 3))) / "test_batch.bin"),
    "cifar100-bin": ("cifar100", lambda d: write_cifar100_bin(d / "cifar-100-binary", tiny_arrays((32, 32, 3))) / "train.bin"),
}


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX special files")
@pytest.mark.parametrize("special", sorted(SPECIAL))
@pytest.mark.parametrize("fmt", sorted(SPECIAL_DATA))
def test_special_dataset_files(fmt: str, special: str, tmp_path: Path, finished_run: tuple[Path, dict], capsys) -> None:
    dataset, make = SPECIAL_DATA[fmt]
    SPECIAL[special](make(tmp_path))
    argv = [*TRAIN, "--dataset", dataset, "--data-dir", tmp_path, "--out", finished_run[0], "--overwrite"]
    with guarded():
        code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err)
    assert code == 2
    check_untouched(finished_run)


def test_config_file_dev_zero(finished_run: tuple[Path, dict[str, bytes]], capsys) -> None:
    with guarded():
        code, _, err = run_main([*TRAIN, "--config", "/dev/zero", "--out", finished_run[0], "--overwrite"], capsys)
    assert "dev/zero" in assert_one_line_error(code, err)
    check_untouched(finished_run)


@pytest.mark.parametrize("device", ["meta", "xla", "cpu:1", "cuda:-1"])
def test_evaluate_bad_device(device: str, finished_run: tuple[Path, dict[str, bytes]], capsys) -> None:
    argv = [EVALUATE[0], finished_run[0], *EVALUATE[1:], "--device", device]
    assert "--device" in assert_one_line_error(*run_main(argv, capsys)[::2])
    check_untouched(finished_run)


# ---------------------------------------------------------------- bad config files

BAD_TOML: dict[str, str | bytes] = {
    "unknown-key": "eps = 0.1\nlearning_rate = 0.1\n",
    "table-instead-of-keys": "[train]\neps = 0.1\n",
    "eps-list": "eps = [1, 2]\n",
    "eps-nan": "eps = nan\n",
    "lr-inf": "lr = inf\n",
    "epochs-string": 'epochs = "ten"\n',
    "epochs-float": "epochs = 1.5\n",
    "epochs-bool": "epochs = true\n",
    "seed-negative": "seed = -1\n",
    "batch-size-zero": "batch_size = 0\n",
    "compile-string": 'compile = "yes"\n',
    "dataset-int": "dataset = 5\n",
    "norm-table": "[norm]\np = 2\n",
    "out-int": "out = 5\n",
    "data-dir-list": "data_dir = [1]\n",
    "resume-string": 'resume = "no"\n',
    "device-int": "device = 0\n",
    "invalid-toml": "eps = = 3\n",
    "unterminated-string": 'model = "mlp\n',
    "binary-garbage": b"\xff\xfe\x00\x81garbage",
    "duplicate-key-dash-underscore": "batch_size = 10\nbatch-size = 20\n",
    "duplicate-key-out": 'out = "a"\n"out" = "b"\n',
    "larger-than-1-mib": "# " + "x" * (1 << 20) + "\n",
}


@pytest.mark.parametrize("case", sorted(BAD_TOML))
def test_bad_config_file(case: str, tmp_path: Path, finished_run: tuple[Path, dict[str, bytes]], capsys) -> None:
    path = tmp_path / "cfg.toml"
    text = BAD_TOML[case]
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    flags = [f for key, value in RUN_CONFIG.items() if key not in str(text) for f in (f"--{key}", str(value))]
    argv = [
        "train",
        "--no-progress",
        *flags,
        "--config",
        path,
        "--out",
        finished_run[0],
        "--overwrite",
    ]  # flags win over the file
    line = assert_one_line_error(*run_main(argv, capsys)[::2])
    assert "\n" not in line
    check_untouched(finished_run)


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_config_file_unreadable(case: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cfg.toml"
    if case == "directory":
        path.mkdir()
    line = assert_one_line_error(*run_main([*TRAIN, "--config", path], capsys)[::2])
    assert "cfg.toml" in line


# ---------------------------------------------------------------- load_model: the library raises typed errors

BAD_MODEL_DIRS: dict[str, tuple[type[RobustoptError], Callable[[Path], None]]] = {
    "model-missing": (CheckpointError, lambda d: (d / "model.safetensors").unlink()),
    "model-truncated": (CheckpointError, lambda d: _truncate(d / "model.safetensors")),
    "model-flipped": (CheckpointError, lambda d: _flip(100)(d / "model.safetensors")),
    "model-hash-edited": (CheckpointError, lambda d: _edit_hash(d / "model.safetensors")),
    "model-garbage": (CheckpointError, lambda d: (d / "model.safetensors").write_bytes(os.urandom(100))),
    "model-other-architecture": (CheckpointError, lambda d: _incomplete(d / "model.safetensors")),
    "config-missing": (RunDirError, lambda d: (d / "config.json").unlink()),
    "config-corrupt": (RunDirError, lambda d: (d / "config.json").write_text("{")),
    "config-missing-field": (RunDirError, lambda d: _edit_json(d / "config.json", lambda c: c.pop("normalization"))),
    "config-unknown-model": (RobustoptError, lambda d: _edit_json(d / "config.json", lambda c: c.update(model="vgg"))),
    "config-wrong-type": (RunDirError, lambda d: _edit_json(d / "config.json", lambda c: c.update(input_shape=7))),
    "config-not-an-object": (RunDirError, lambda d: (d / "config.json").write_text("[1, 2]")),
    "dir-missing": (RunDirError, lambda d: shutil.rmtree(d)),
    "config-huge-num-classes": (RunDirError, lambda d: _set_config(d, num_classes=10**12)),
    "config-num-classes-string": (RunDirError, lambda d: _set_config(d, num_classes="10")),
    "config-num-classes-zero": (RunDirError, lambda d: _set_config(d, num_classes=0)),
    "config-huge-input-shape": (RunDirError, lambda d: _set_config(d, input_shape=[1, 10**6, 10**6])),
    "config-std-zero": (RunDirError, lambda d: _set_config(d, normalization={"mean": [0.1], "std": [0.0]})),
    "config-mean-wrong-length": (RunDirError, lambda d: _set_config(d, normalization={"mean": [0, 1], "std": [1]})),
    "model-header-lies": (CheckpointError, lambda d: _huge_header(d / "model.safetensors")),
    "model-is-a-directory": (RobustoptError, lambda d: _as_dir(d / "model.safetensors")),
    "model-metadata-not-an-object": (CheckpointError, lambda d: save_tensors(d / MODEL_FILE, {"w": torch.zeros(1)}, [1])),
    "model-shapes": (CheckpointError, lambda d: _edit_checkpoint(_set_tensor("net.1.bias", torch.zeros(2)))(d / MODEL_FILE)),
}


def _set_config(run: Path, **changes: object) -> None:
    _edit_json(run / "config.json", lambda c: c.update(changes))


def _set_tensor(name: str, value: torch.Tensor) -> Callable[[dict, dict], None]:
    return lambda meta, tensors: tensors.update({name: value})


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", sorted(BAD_MODEL_DIRS))
def test_load_model_bad_files(case: str, unfinished_run: Path) -> None:
    kind, tamper = BAD_MODEL_DIRS[case]
    tamper(unfinished_run)
    with pytest.raises(kind) as info:
        load_model(unfinished_run)
    assert "\n" not in str(info.value) and str(info.value)


def test_load_model_intact(finished_run: tuple[Path, dict[str, bytes]]) -> None:
    """The control: the untampered run loads, so the failures above come from the tampering."""
    model = load_model(finished_run[0])
    assert not model.training


# ---------------------------------------------------------------- the error path itself


def test_unexpected_exception_is_one_line_internal_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def boom(**kwargs: object) -> None:
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli_app, "app", boom)
    code, _, err = run_main(["train"], capsys)
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == ["robustopt: internal error: RuntimeError: something broke (rerun with --debug for the traceback)"]


def test_os_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def full(**kwargs: object) -> None:
        raise OSError(28, "No space left on device", "/runs/x/checkpoint.safetensors")

    monkeypatch.setattr(cli_app, "app", full)
    line = assert_one_line_error(*run_main(["train"], capsys)[::2], documented=False)
    assert "No space left on device" in line


# ---------------------------------------------------------------- real subprocesses

SUBPROCESS_CASES: dict[str, list[str]] = {
    "unknown-model": [*TRAIN, "--model", "vgg"],
    "eps-nan": [*TRAIN, "--eps", "nan"],
    "truncated-npz": [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "{data}"],
    "tampered-checkpoint": [*TRAIN, "--out", "{run}", "--resume"],
    "download-unknown": ["download", "imagenet", "--dest", "{tmp}/dl"],
}


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory: pytest.TempPathFactory, pristine_run: tuple[Path, dict[str, bytes]]) -> dict:
    """Run every subprocess case (and one with --debug) concurrently; {case: CompletedProcess}."""
    tmp = tmp_path_factory.mktemp("subprocess")
    _truncated_npz(tmp)
    run = tmp / "run"
    run.mkdir()
    for name, data in pristine_run[1].items():
        if name != "summary.json":
            (run / name).write_bytes(data)
    _flip(1)(run / "checkpoint.safetensors")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("ROBUSTOPT_DATA", None)
    cases = {**SUBPROCESS_CASES, "debug": ["--debug", *TRAIN, "--model", "vgg"]}

    def launch(argv: list[str]) -> subprocess.CompletedProcess:
        args = [str(a).format(data=tmp, run=run, tmp=tmp) for a in argv]
        return subprocess.run([sys.executable, "-m", "robustopt", *args], capture_output=True, text=True, env=env, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(cases, pool.map(launch, cases.values()), strict=True))


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_subprocess(case: str, subprocess_results: dict) -> None:
    res = subprocess_results[case]
    assert_one_line_error(res.returncode, res.stderr)
    assert res.returncode == 2


def test_subprocess_debug_shows_traceback(subprocess_results: dict) -> None:
    res = subprocess_results["debug"]
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "ConfigError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("robustopt: error: unknown model 'vgg'")


def test_error_list_is_complete_and_one_line() -> None:
    """scripts/list_errors.py finds the messages (at least one per error class) and each is a single line."""
    module = _list_errors()
    messages = module.collect()
    assert len(messages) >= 50
    assert {"ConfigError", "DataError", "CheckpointError", "RunDirError"} <= {m.kind for m in messages}
    assert all(m.text.strip() and "\n" not in m.text for m in messages), [m for m in messages if "\n" in m.text]
    assert "## `threat/model.py`" in module.markdown(messages)  # ThreatModel.check_fits: eps larger than the domain
