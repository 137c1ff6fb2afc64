"""The one lazy import of matplotlib, for every PNG the CLI writes.

matplotlib is an install requirement, but the core must import without it (only torch and the standard library
at module level), so the charts import it on first use, headless (Agg).
"""
from __future__ import annotations

from typing import Any


def pyplot(what: str = "charts") -> Any:
    """``matplotlib.pyplot`` with the Agg backend; ImportError naming ``what`` needs it when it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"{what} need matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
