"""A run that loses a node, its relaunch on the survivors from the last checkpoint, and the recovery timeline.

    with EmulatedCluster(nodes=2, ranks_per_node=2) as cluster:
        recovery = run_and_relaunch(cluster, command, kill=NodeKill(node=1, on_line="step 5 start"), timeout=300)
    print(recovery.report())

The program resumes by itself from the checkpoint it writes (``train_worker.py`` does): the relaunch starts the
same command on the nodes that are left, as a smaller world with the first survivor as MASTER_ADDR. The launcher
knows when it lost the node, when the world had failed (the last rank of the first run had ended: the survivors
found the loss themselves, or the grace ran out and the launcher killed them) and when it relaunched. The ranks say
when they were up, when the checkpoint was loaded and when they had caught up (done again the steps since the
checkpoint) with output lines ``timeline: NAME EPOCH`` (``timeline_mark``; ``time.time()``: every namespace
shares the machine's clock).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import IO, Mapping, Sequence

from .launcher import ClusterResult, EmulatedCluster, NodeKill

_MARK_RE = re.compile(r"^timeline: ([a-z-]+) ([0-9]+(?:\.[0-9]*)?)\s*$", re.M)
# (event a rank reports, what the timeline calls it), in the order they happen
RANK_EVENTS = (("up", "relaunched ranks up (gloo rendezvous done)"), ("loaded", "checkpoint loaded"),
               ("caught-up", "caught up (the steps since the checkpoint done again)"))


def timeline_mark(name: str) -> str:
    """The output line a rank prints when event ``name`` (``up``, ``loaded``, ``caught-up``) happens."""
    if not re.fullmatch(r"[a-z-]+", name):
        raise ValueError(f"name={name!r} must be lower-case letters and dashes")
    return f"timeline: {name} {time.time():.6f}"


def rank_events(result: ClusterResult) -> dict[str, float]:
    """When each ``timeline:`` event had happened on every rank that reported it (the latest rank's time)."""
    out: dict[str, float] = {}
    for r in result.ranks:
        for name, stamp in _MARK_RE.findall(r.output):
            out[name] = max(out.get(name, 0.0), float(stamp))
    return out


@dataclass(frozen=True)
class Recovery:
    """The run that lost a node (``first``) and the relaunch on the survivors (None: no node was lost, or none is
    left)."""

    first: ClusterResult
    relaunch: ClusterResult | None

    @property
    def ok(self) -> bool:
        return self.relaunch is not None and self.relaunch.ok

    def events(self) -> list[tuple[str, float]]:
        """(event, ``time.time()``) in the order they happened; only those that did."""
        first = self.first
        if first.killed_node is None or first.killed_s is None:
            return []
        ended = [r.ended_s if r.ended_s is not None else first.elapsed_s for r in first.ranks]
        out = [(f"node {first.killed_node} lost (link down, its processes killed)", first.started_at + first.killed_s),
               ("world failed (every rank of the first run had ended)", first.started_at + max(ended))]
        if self.relaunch is None:
            return out
        out.append((f"relaunch started on node(s) {', '.join(map(str, self.relaunch.nodes))}",
                    self.relaunch.started_at))
        marks = rank_events(self.relaunch)
        out += [(label, marks[name]) for name, label in RANK_EVENTS if name in marks]
        return out

    def survivors_detected(self) -> bool:
        """Whether every surviving rank of the first run ended by itself (not killed by the launcher)."""
        lost = self.first.killed_node
        return all(r.returncode is not None for r in self.first.ranks if r.node != lost)

    def report(self) -> str:
        """The timeline as a table: seconds since the previous event and since the loss."""
        events = self.events()
        if not events:
            return "no node was lost: the run ended before the kill"
        rows = ["| event | seconds after the previous | since the loss |", "| --- | --- | --- |"]
        prev = events[0][1]
        for label, stamp in events:
            rows.append(f"| {label} | {stamp - prev:.2f} | {stamp - events[0][1]:.2f} |")
            prev = stamp
        how = ("found the loss themselves" if self.survivors_detected() else
               "were killed by the launcher after the grace")
        rows.append(f"the survivors of the first run {how}; codes by rank "
                    f"{{{', '.join(f'{r.rank}:{r.returncode}' for r in self.first.ranks)}}}")
        return "\n".join(rows)


def run_and_relaunch(cluster: EmulatedCluster, command: Sequence[str], *, kill: NodeKill, timeout: float,
                     grace: float = 60.0, env: Mapping[str, str] | None = None,
                     echo: IO[str] | None = None) -> Recovery:
    """Run ``command`` losing ``kill.node``; then run it again on the nodes left (each run bounded by ``timeout``).

    The relaunch takes MASTER_PORT + 2 (+ 1 is the watchdog's side store): a port of the first run's rank 0 may
    still be held by its closing sockets.
    """
    first = cluster.run(command, timeout=timeout, grace=grace, env=env, echo=echo, kill=kill)
    if first.killed_node is None or not cluster.live_nodes:
        return Recovery(first=first, relaunch=None)
    relaunch = cluster.run(command, timeout=timeout, grace=grace, env=env, echo=echo, port=cluster.master_port + 2)
    return Recovery(first=first, relaunch=relaunch)
