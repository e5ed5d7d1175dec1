"""Typed, user-facing errors.

Every error a user can cause (bad flags, bad files, bad data) is raised as a subclass of
:class:`RobustoptError` with a one-line message that says what is wrong and what to do. The CLI
prints that line and exits non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class RobustoptError(Exception):
    """Base class for every error robustopt raises on purpose."""

    exit_code: int = 2


class ConfigError(RobustoptError, ValueError):
    """An invalid option, flag or configuration file."""


class DataError(RobustoptError):
    """A dataset is missing, truncated, corrupt or malformed."""


class CheckpointError(RobustoptError):
    """A model or checkpoint file is missing, truncated or tampered with."""


class RunDirError(RobustoptError):
    """A run directory conflicts with what was asked (finished run, other configuration)."""


def one_line(text: str) -> str:
    """``text`` folded onto one line: every message a user sees is a single line."""
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
