"""Reading the JSON and YAML files users write: topologies, load traces, calibrations, configs.

A file that does not parse is a ``ValueError`` that names the file, the line and the column, not a bare
"Extra data: line 1 column 2" or a parser's traceback. It lives at the bottom floor (placement/, whose own inputs
are such files) so that every reader in the package can use it.
"""
from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike) -> Any:
    """The parsed content of a JSON file. Raises OSError if it cannot be opened, ValueError if it is not JSON."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(path)}: not valid JSON at line {err.lineno}, column {err.colno}: "
                         f"{err.msg}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """The parsed content of a YAML file (``yaml.safe_load``). Raises OSError if it cannot be opened, ValueError if
    it is not YAML."""
    try:
        import yaml  # lazy: the core imports only torch and the standard library at module level
    except ImportError as err:
        raise ImportError(f"reading {os.fspath(path)} needs pyyaml: pip install pyyaml") from err
    text = _read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{os.fspath(path)}: not valid YAML{where}: {problem}") from None


def _read_text(path: str | os.PathLike) -> str:
    with open(path, encoding="utf-8") as f:
        try:
            return f.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"{os.fspath(path)}: not a UTF-8 text file (byte {err.start})") from None
