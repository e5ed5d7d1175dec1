"""Files: atomic writes (temp file, fsync, rename), and reading untrusted files safely: regular files only,
and never more bytes than a header justifies.

Every file robustopt reads (run directories, checkpoints, datasets) may have been hand-edited,
truncated, replaced by a FIFO (``open`` would block forever) or symlinked to ``/dev/zero`` (a
read-all would grow memory without bound). So readers open with ``O_NONBLOCK`` (a FIFO opens
at once instead of waiting for a writer), ``fstat`` the open descriptor (no race with a rename)
and refuse anything that is not a regular file. Sizes that a header declares are checked against
the bytes actually there, and against the machine's memory, before anything is allocated.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from robustopt.errors import RobustoptError, RunDirError

# deflate expands at most ~1032:1; a compressed member declaring more than this is a lie or a bomb
MAX_DEFLATE_RATIO = 1100
MAX_JSON_BYTES = 64 << 20  # config.json, summary.json, metrics.jsonl: kilobytes in practice


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (a generous 1 TiB when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 40


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | Path) -> tuple[BinaryIO, int]:
    """Open ``path`` (symlinks followed) for reading if it is a regular file; returns (file, size).

    Raises FileNotFoundError / PermissionError as ``open`` does, and :class:`RobustoptError` for a
    directory, FIFO, device or socket. The caller closes the file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RobustoptError(f"{path} is {_kind(st.st_mode)}, not a regular file; robustopt reads only regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """All bytes of the regular file ``path``, refusing files larger than ``max_bytes``."""
    f, size = open_regular(path)
    with f:
        if size > max_bytes:
            raise RobustoptError(f"{path} is {size} bytes, more than the {max_bytes} expected of it; is it the right file?")
        return f.read(size)


def check_declared_size(path: str | Path, declared: int, available: int, what: str) -> None:
    """A header declared ``declared`` bytes: refuse when the file cannot hold them or memory cannot."""
    if declared > available:
        raise RobustoptError(f"{path}: {what} declares {declared} bytes but only {available} are there; truncated or corrupt")
    if declared > memory_bytes():
        raise RobustoptError(f"{path}: {what} declares {declared} bytes, more than this machine's memory; is it the right file?")


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_regular(path, MAX_JSON_BYTES).decode())
    except FileNotFoundError:
        raise RunDirError(f"{path} not found; is this a robustopt run directory?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is corrupt ({e}); re-run training with --overwrite") from None


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Render a matplotlib figure in memory, then :func:`atomic_write` it: a failed rerun never truncates a good plot."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    atomic_write(Path(path), buf.getvalue())
    return Path(path)
