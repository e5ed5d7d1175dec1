"""What a person watching training sees: one readable line per epoch, a progress bar only on a
terminal, and optional TensorBoard scalars. Rank 0 alone reports."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from robustopt.errors import ConfigError

Log = Callable[[str], None]


def want_bar(progress: bool | None, is_main: bool) -> bool:
    """A bar when asked, or by default only when stderr is a terminal (a log file gets no carriage returns)."""
    if not is_main:
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


def make_bar(enabled: bool, total: int, initial: int, epoch: int, epochs: int) -> tqdm:
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not enabled, unit="batch")


CHANCE_EPOCHS, CHANCE_MARGIN = 3, 0.02


def chance_accuracy(labels: Any, num_classes: int) -> float:
    """The clean accuracy of always answering the most frequent test label (1/K when the labels are not in memory)."""
    if labels is None or len(labels) == 0:
        return 1.0 / max(num_classes, 1)
    return float(labels.long().flatten().bincount().max()) / len(labels)


def not_learning(history: list[dict[str, Any]], chance: float) -> str | None:
    """A warning when clean test accuracy has stayed within 2 points of chance for the last 3 epochs, else None.

    A net that never leaves chance (too high a learning rate, ε too large from the first step, labels that do not
    match the inputs) otherwise trains for hours with nothing in the log to say so. Clean accuracy is the signal,
    not the loss: robust and certified losses sit above ln K for a while in healthy runs.
    """
    recent = [row.get("test_acc") for row in history[-CHANCE_EPOCHS:]]
    if len(recent) < CHANCE_EPOCHS or any(a is None or a > chance + CHANCE_MARGIN for a in recent):
        return None
    return (
        f"warning: clean test accuracy has stayed at chance ({chance:.3f}) for {CHANCE_EPOCHS} epochs: the net is not "
        "learning; try a lower --lr, an ε ramp (--eps-ramp-epochs), or check that the labels match the inputs"
    )


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """``epoch 3/10  loss 0.41  train acc (perturbed batches) 0.83  test acc 0.97  pgd-10 acc 0.88 (500 held out)  12.3s``."""
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"loss {row['loss']:.4f}",
        f"train acc ({row['train_acc_on']}) {row['train_acc']:.4f}",
    ]
    if row.get("test_acc") is not None:
        parts.append(f"test acc (clean) {row['test_acc']:.4f}")
    if row.get("pgd_acc") is not None:
        parts.append(f"pgd-{row['pgd_steps']} acc {row['pgd_acc']:.4f} ({row['pgd_n']} held out)")
    if row.get("guard_pgd_acc") is not None:
        parts.append(f"guard pgd acc {row['guard_pgd_acc']:.4f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


class Board:
    """TensorBoard scalars per epoch when asked for; a no-op otherwise."""

    def __init__(self, run_dir: Path | None) -> None:
        self.writer = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def epoch(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
