"""The shell commands the documentation shows, read the way a user reads them (tests/test_docs_commands.py runs them).

Where commands are (paths relative to the repository root):
    README.md, docs/*.md, ds_configs/README.md, examples/**/README.md   Markdown
    examples/**/*.py, benchmarks/*.py                                   the "How to run" paragraph of the docstring

What counts as a command:
    * every line of a ```bash (or sh, shell) block, and of a "How to run" paragraph; a line ending in ``\\``
      continues on the next; comment lines are not commands;
    * in Markdown prose and tables, a code span that starts with a program the project documents (largeep, python,
      python3, torchrun, deepspeed, bash, pytest, pip) and passes it an option (``-x``) or a file path: a bare
      program or subcommand name (`largeep plan`) is a name, not a command.

The marker for a command that cannot run on a CPU machine, visible to readers too:
    * in a block: a trailing comment that starts with ``needs:`` (``largeep bench overlap   # needs: root``), or a
      comment line ``# needs: ...`` that covers the commands after it up to the next blank line;
    * in prose: ``(needs: ...)`` right after the code span.
"""
from __future__ import annotations

import ast
import glob
import inspect
import os
import re
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("largeep", "python", "python3", "torchrun", "deepspeed", "bash", "pytest", "pip")
SHELL_BLOCKS = ("bash", "sh", "shell")
_FENCE = re.compile(r"^\s*```\s*(\S*)")
_SPAN = re.compile(r"`([^`\n]+)`(\s*\(needs:\s*([^)]*)\))?")
_NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")


@dataclass(frozen=True)
class Command:
    """One command as shown: ``text`` exactly as written (continuations and trailing comment included),
    ``where`` (file:line), ``needs`` (the marker's reason, or None when it must run here)."""

    text: str
    where: str
    needs: str | None

    @property
    def key(self) -> str:
        """The command without its trailing comment and with single spaces: the same command shown twice."""
        return " ".join(strip_comment(self.text.replace("\\\n", " ")).split())


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (the docs put no ``#`` inside quotes)."""
    cut = re.search(r"(^|\s)#", line)
    return line[: cut.start()].rstrip() if cut else line.rstrip()


def doc_files(root: str = ROOT) -> list[str]:
    """The documentation files, relative to ``root``, in the order the check runs them (README first)."""
    patterns = ("README.md", "docs/*.md", "ds_configs/README.md", "examples/**/README.md", "examples/**/*.py",
                "benchmarks/*.py")
    out: list[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            rel = os.path.relpath(path, root)
            if rel not in out:
                out.append(rel)
    return out


def block_commands(lines: list[tuple[int, str]], where: str) -> list[Command]:
    """Commands of a shell block: ``(line number, text)`` pairs, dedented or not."""
    out: list[Command] = []
    covering: str | None = None  # a "# needs:" line covers what follows, up to a blank line
    pending: list[str] = []
    first = 0
    for number, raw in lines:
        line = raw.strip()
        if not pending:
            if not line:
                covering = None
                continue
            if line.startswith("#"):
                marker = _NEEDS.match(line)
                covering = marker.group(1).strip() if marker else covering
                continue
            first = number
        pending.append(line)
        if line.endswith("\\"):
            continue
        text = "\n".join(pending)
        pending = []
        comment = line[len(strip_comment(line)):].strip()
        marker = _NEEDS.match(comment)
        out.append(Command(text, f"{where}:{first}", marker.group(1).strip() if marker else covering))
    return out


def markdown_commands(text: str, where: str) -> list[Command]:
    """The commands of one Markdown file: shell blocks, then the code spans in prose that are commands."""
    out: list[Command] = []
    block: list[tuple[int, str]] | None = None
    language = ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if fence:
            if block is None:
                block, language = [], fence.group(1).lower()
            else:
                if language in SHELL_BLOCKS:
                    out.extend(block_commands(block, where))
                block = None
            continue
        if block is not None:
            block.append((number, line))
            continue
        for span in _SPAN.finditer(line):
            if is_command(span.group(1)):
                needs = span.group(3).strip() if span.group(3) else None
                out.append(Command(span.group(1), f"{where}:{number}", needs))
    return out


def is_command(span: str) -> bool:
    """A prose code span that is a whole command: a documented program given an option or a path."""
    words = span.split()
    if len(words) < 2 or words[0] not in PROGRAMS:
        return False
    return any(w.startswith("-") or "/" in w or w.endswith((".py", ".json", ".sh")) for w in words[1:])


def docstring_commands(source: str, where: str) -> list[Command]:
    """The "How to run" paragraph of a script's docstring: the indented lines after the header line."""
    body = ast.parse(source).body
    if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return []
    raw = body[0].value.value
    lines = inspect.cleandoc(raw).splitlines()
    # cleandoc drops the blank lines at the start: doc line i is source line `first + i`.
    first = body[0].lineno + next(i for i, line in enumerate(raw.split("\n")) if line.strip())
    start = next((i for i, line in enumerate(lines) if re.match(r"how to run\b.*:\s*$", line, re.I)), None)
    if start is None:
        return []
    block: list[tuple[int, str]] = []
    for i in range(start + 1, len(lines)):
        if lines[i].strip() and not lines[i].startswith((" ", "\t")):
            break  # back to prose
        if not lines[i].strip() and any(text.strip() for _, text in block):
            break  # the paragraph of commands is over
        block.append((first + i, lines[i]))
    return block_commands(block, where)


def occurrences(root: str = ROOT) -> dict[str, list[Command]]:
    """Every place each command is shown, by ``Command.key``, in file order."""
    out: dict[str, list[Command]] = {}
    for rel in doc_files(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()
        for command in docstring_commands(text, rel) if rel.endswith(".py") else markdown_commands(text, rel):
            out.setdefault(command.key, []).append(command)
    return out


def all_commands(root: str = ROOT) -> list[Command]:
    """Every command of the documentation once (at its first place), in file order: the order the check runs."""
    return [places[0] for places in occurrences(root).values()]
