"""What the local launcher (launch.py) says when a world fails: one line per rank, the rank that died first.

When one rank dies, its peers fail within milliseconds with "Connection closed by peer", often before anyone
notices the death. Ordering the report by *kind* (died, then raised, then stopped) instead of by arrival names
the real culprit first; one line per rank keeps sixteen tracebacks from burying it.
"""
from __future__ import annotations

import os
import signal
import traceback
from dataclasses import dataclass
from typing import Any

import torch

_SUMMARY_CHARS = 300
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def error_outcome(exc: BaseException) -> tuple[str, str, str, str]:
    """The message a rank sends for an exception: ("error", one-line summary with its place, full traceback,
    exception type name)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(summary) > _SUMMARY_CHARS:
        summary = summary[:_SUMMARY_CHARS] + " ..."
    # The innermost frame outside torch says where the rank was: "in all_reduce" alone does not.
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if not f.filename.startswith(_TORCH_DIR)] or frames
    if ours:
        summary += f" (at {os.path.basename(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name})"
    return "error", summary, "".join(traceback.format_exception(exc)), type(exc).__name__


@dataclass
class RankOutcome:
    """How one rank ended: ``kind`` is "ok" (``value``), "raised" (``error_type``, ``summary``, ``traceback``) or
    "exited" without a result (``exit_code``, filled in once the process is reaped; negative: killed by that
    signal)."""

    kind: str
    ended_at: float
    value: Any = None
    summary: str = ""
    traceback: str = ""
    error_type: str = ""
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @classmethod
    def from_message(cls, message: Any, ended_at: float) -> "RankOutcome":
        """From what the rank sent (None: it sent nothing)."""
        if message is None:
            return cls(kind="exited", ended_at=ended_at)
        if message[0] == "ok":
            return cls(kind="ok", ended_at=ended_at, value=message[1])
        return cls(kind="raised", ended_at=ended_at, summary=message[1], traceback=message[2], error_type=message[3])

    def describe(self) -> str:
        if self.kind == "raised":
            return self.summary
        code = self.exit_code
        if code is not None and code < 0:
            return f"died: killed by {signal_name(-code)}"
        return f"died: exited with status {code} without a result"


def describe_failure(outcomes: dict[int, RankOutcome], missing: list[int], world_size: int, grace: float, *,
                     verbose: bool, hint_env: str) -> tuple[str, int]:
    """The message of a failed world and the rank it blames.

    Args:
        outcomes: {rank: outcome} in the order the ranks ended (at least one not ok).
        missing: ranks still running when the launcher stopped them.
    Returns:
        (message, blamed rank): the first rank to die, else the first to raise.
    """
    died = [r for r, o in outcomes.items() if o.kind == "exited"]
    raised = [r for r, o in outcomes.items() if o.kind == "raised"]
    finished = sorted(r for r, o in outcomes.items() if o.ok)
    blamed = (died or raised)[0]
    lines = [f"world of {world_size} ranks failed: rank {blamed} {_verb(outcomes[blamed])}"]
    lines += [f"  rank {r}: {outcomes[r].describe()}" for r in died + raised]
    lines += [f"  rank {r}: still running {grace:g}s after the first failure; stopped" for r in missing]
    if finished:
        lines.append(f"  rank(s) {finished}: finished")
    if verbose:
        for r in raised:
            lines.append(f"---- rank {r} ----\n{outcomes[r].traceback.rstrip()}")
    elif raised:
        lines.append(f"  (full tracebacks: WorldError.tracebacks, or set {hint_env}=1)")
    return "\n".join(lines), blamed


def _verb(outcome: RankOutcome) -> str:
    if outcome.kind == "raised":
        return f"raised {outcome.error_type}"
    return outcome.describe()
