"""List every user-facing error message in robustopt, read from the source by its syntax tree.

A message is the first argument of ``raise ConfigError(...)``, ``DataError``, ``CheckpointError``,
``RunDirError``, ``RobustoptError`` or any other class named in ``robustopt.errors``. String
literals are printed as they are; an f-string's ``{expression}`` parts are kept as placeholders,
so the list shows both the fixed text and what is filled in. Nothing is imported or executed.

Usage: ``python scripts/list_errors.py > docs/errors.md`` (``--check`` exits 1 when the file differs).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "robustopt"
DOC = ROOT / "docs" / "errors.md"


@dataclass(frozen=True)
class Message:
    kind: str  # the exception class
    file: str  # relative to src/robustopt
    line: int
    text: str  # with {placeholders} for the f-string parts


def error_classes(errors_py: Path) -> set[str]:
    """Names of the classes defined in robustopt/errors.py (the typed, user-facing errors)."""
    tree = ast.parse(errors_py.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


def render(node: ast.expr) -> str:
    """A message expression as text: literals verbatim, f-string fields and other expressions as {source}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(render(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        conversion = "" if node.conversion == -1 else "!" + chr(node.conversion)
        spec = ":" + render(node.format_spec) if node.format_spec is not None else ""
        return "{" + ast.unparse(node.value) + conversion + spec + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return render(node.left) + render(node.right)
    return "{" + ast.unparse(node) + "}"


def messages_in(path: Path, classes: set[str]) -> list[Message]:
    """Every ``raise <ErrorClass>(message, ...)`` in one file, in line order."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
            continue
        func = node.exc.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name in classes and node.exc.args:
            out.append(Message(name, path.relative_to(SRC).as_posix(), node.lineno, render(node.exc.args[0])))
    return sorted(out, key=lambda m: m.line)


def collect(src: Path = SRC) -> list[Message]:
    classes = error_classes(src / "errors.py")
    return [m for path in sorted(src.rglob("*.py")) for m in messages_in(path, classes)]


def markdown(messages: list[Message]) -> str:
    lines = [
        "# Error messages",
        "",
        "Every message robustopt raises on purpose, extracted from the source by `scripts/list_errors.py`",
        "(regenerate with `python scripts/list_errors.py > docs/errors.md`). The command line prints each as",
        "`robustopt: error: <message>` and exits with status 2 (`--debug` adds the traceback); the library",
        "raises the typed exception with the same message. `{...}` marks a value filled in at run time.",
        "",
        "Besides these, the CLI reports operating-system errors (permission denied, disk full) as",
        "`robustopt: error: <reason>: <path>` with status 2, click's usage errors (a bad flag, a missing value)",
        "with status 2, Ctrl-C as `robustopt: interrupted; finished epochs and checkpoints are kept (use --resume)`",
        "with status 130, SIGTERM as `robustopt: stopped by SIGTERM; ...` with status 143, and anything unexpected",
        "as a one-line `robustopt: internal error: ...` with status 1.",
        "",
        f"{len(messages)} messages.",
    ]
    current = None
    for m in messages:
        if m.file != current:
            current = m.file
            lines += ["", f"## `{m.file}`", "", "| line | error | message |", "|---:|---|---|"]
        text = m.text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {m.line} | {m.kind} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    doc = markdown(collect())
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != doc:
            print(f"{DOC} is out of date; run: python scripts/list_errors.py > docs/errors.md", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
