"""Every Python block of the README runs as written, in order, in one fresh interpreter in an empty directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks(README.read_text())) >= 3


def test_the_readmes_test_command_is_what_ci_runs() -> None:
    """The README promises that its second command is exactly what CI runs: .ci/run's command line, verbatim."""
    ci = (README.parent / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith(".venv/bin/pip install"))
    assert f"python3 -m venv .venv && {command}" in README.read_text()


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs_as_written(tmp_path: Path) -> None:
    script = "\n\n".join(python_blocks(README.read_text()))
    (tmp_path / "readme_blocks.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "readme_blocks.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clean" in done.stdout
