"""The ``largeep`` subcommands, one module each (``cli.py`` lists them); ``bench`` has its own, ``bench_<name>.py``."""
from __future__ import annotations

import importlib
from typing import Any, Sequence


def register_subcommands(subparsers: Any, module_names: Sequence[str], run_key: str) -> None:
    """Import each module, let it add its parser, and remember its ``run`` under ``args.<run_key>``."""
    for name in module_names:
        module = importlib.import_module(name)
        p = module.add_parser(subparsers)
        p.set_defaults(**{run_key: module.run})
