"""An emulated multi-node cluster on one machine: start the ranks of a command inside per-node network namespaces.

    with EmulatedCluster(nodes=2, ranks_per_node=4, inter_bw="1gbit", inter_latency="0") as cluster:
        result = cluster.run([sys.executable, "-m", "my.script"], timeout=300)
    print(result.summary())

Each rank runs ``COMMAND`` inside its node's namespace (netns.py) with the torchrun variables set: RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR = the first node's address, MASTER_PORT, and
GLOO_SOCKET_IFNAME=eth0 so gloo binds to the node's address. OMP_NUM_THREADS defaults to 1 (ranks share the
machine's cores).

A lost node (``kill=NodeKill(node=1, on_line="step 5 start")`` or ``after_s=...``): when a rank prints a line
containing ``on_line`` (or ``after_s`` seconds after the start) the launcher takes that node's link down, then kills
every process in its namespace (SIGKILL): it vanishes without a goodbye, and the other ranks must find out by
themselves (a collective timeout, a heartbeat). The node stays lost: later runs start on the nodes that are left
(``live_nodes``), with the first of them as MASTER_ADDR.

Always bounded and always cleaned up: ``run`` kills every rank past ``timeout``; after the first rank fails the
others get ``grace`` seconds to notice and exit on their own (their failure detection is what the tests check),
then they are killed. Leaving the ``with`` block deletes the namespaces on success, on an exception, on Ctrl-C
and on SIGTERM/SIGHUP (turned into exceptions while the cluster is up); entering it first removes namespaces
left behind by runs that were killed outright.
"""
from __future__ import annotations

import collections
import math
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, Mapping, Sequence

from .netns import (ClusterUnavailable, Network, NetworkSpec, kill_processes, parse_duration, parse_rate,
                    remove_leftovers, unavailable_reason)

TAIL_LINES = 200


@dataclass(frozen=True, kw_only=True)
class NodeKill:
    """Lose node ``node`` during a run: when any rank prints a line containing ``on_line``, or ``after_s`` seconds
    after the start (exactly one of the two)."""

    node: int
    after_s: float | None = None
    on_line: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.node, bool) or not isinstance(self.node, int) or self.node < 0:
            raise ValueError(f"node={self.node!r} must be an integer >= 0")
        if (self.after_s is None) == (self.on_line is None):
            raise ValueError(f"give exactly one of after_s={self.after_s!r} and on_line={self.on_line!r}")
        if self.after_s is not None and not (isinstance(self.after_s, (int, float)) and math.isfinite(self.after_s)
                                             and self.after_s >= 0):
            raise ValueError(f"after_s={self.after_s!r} must be a finite number of seconds >= 0")
        if self.on_line is not None and not (isinstance(self.on_line, str) and self.on_line.strip()):
            raise ValueError(f"on_line={self.on_line!r} must be a non-empty string")

    @classmethod
    def parse(cls, node: int, when: str, field: str = "kill_at") -> "NodeKill":
        """``when``: seconds after the start ('20s', '1.5s', '500ms') or ``line:TEXT`` (the first output line of
        any rank that contains TEXT). ValueError naming ``field``."""
        if when.startswith("line:"):
            if not when[5:].strip():
                raise ValueError(f"{field}={when!r} gives no text after 'line:'")
            return cls(node=node, on_line=when[5:])
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms)\s*", when)
        if not m:
            raise ValueError(f"{field}={when!r} is neither a time like '20s' or '500ms' nor 'line:TEXT'")
        return cls(node=node, after_s=float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1.0))


@dataclass(frozen=True)
class RankResult:
    """How one rank ended: ``returncode`` (negative = killed by that signal, None = killed by the launcher after
    the grace or the timeout), when (``ended_s`` after the start, None if killed by the launcher) and the last
    lines of its output. ``node`` is the cluster's node (its namespace), whatever the nodes of the run."""

    rank: int
    node: int
    returncode: int | None
    ended_s: float | None
    output: str


@dataclass(frozen=True)
class ClusterResult:
    """The outcome of one ``EmulatedCluster.run``."""

    ranks: tuple[RankResult, ...]
    elapsed_s: float
    timed_out: bool
    first_failure: int | None  # rank that failed first, None if none did
    started_at: float = 0.0          # time.time() when the first rank was started
    nodes: tuple[int, ...] = ()      # the cluster's nodes this run used, in node-rank order
    killed_node: int | None = None   # the node lost during the run (NodeKill), None if none was
    killed_s: float | None = None    # when it was lost, seconds after the start

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(r.returncode == 0 for r in self.ranks)

    @property
    def exit_code(self) -> int:
        """0 on success, 124 on timeout, else the first failed rank's code (1 if it was killed by a signal)."""
        if self.ok:
            return 0
        if self.timed_out:
            return 124
        code = self.ranks[self.first_failure].returncode if self.first_failure is not None else 1
        return code if code and code > 0 else 1

    def summary(self) -> str:
        codes = ", ".join(f"{r.rank}:{r.returncode}" for r in self.ranks)
        head = "ok" if self.ok else ("timed out" if self.timed_out else f"rank {self.first_failure} failed first")
        lost = "" if self.killed_node is None else f"; node {self.killed_node} lost at {self.killed_s:.1f}s"
        return f"{head} after {self.elapsed_s:.1f}s{lost}; exit codes by rank {{{codes}}}"


class EmulatedCluster:
    """``nodes`` namespaces of ``ranks_per_node`` ranks each, joined by a shaped link (see the module docstring).

    Args:
        nodes: number of nodes (namespaces), >= 1.
        ranks_per_node: ranks started in each node, >= 1.
        inter_bw: inter-node bandwidth per node and direction, tc units ('1gbit', '200mbit').
        inter_latency: one-way inter-node latency ('100us', '1ms', '0'); > 0 needs the netem qdisc.
        master_port: rendezvous port on the first node (namespaces are private, so no clash with the host).
    Raises:
        ClusterUnavailable on entering, when this machine cannot host it (the message says why).
    """

    def __init__(self, nodes: int, ranks_per_node: int, inter_bw: str = "1gbit", inter_latency: str = "0", *,
                 master_port: int = 29500):
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node!r} must be an integer >= 1")
        if not 1024 <= master_port <= 65000:
            raise ValueError(f"master_port={master_port!r} must be in [1024, 65000]")
        self.spec = NetworkSpec(nodes=nodes, bandwidth_bits=parse_rate(inter_bw), latency_s=parse_duration(inter_latency))
        self.ranks_per_node = ranks_per_node
        self.master_port = master_port
        self.network: Network | None = None
        self._old_handlers: dict[int, Any] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self.lost_nodes: set[int] = set()

    @property
    def world_size(self) -> int:
        """Ranks of a run on every node that is not lost."""
        return len(self.live_nodes) * self.ranks_per_node

    @property
    def live_nodes(self) -> tuple[int, ...]:
        """The nodes a run starts on: all but the lost ones."""
        return tuple(n for n in range(self.spec.nodes) if n not in self.lost_nodes)

    # ---- lifetime ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "EmulatedCluster":
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self._install_signal_handlers()
        try:
            remove_leftovers()
            self.network = Network(self.spec)
            self.network.create()
        except BaseException:
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill any rank still running and delete the namespaces (idempotent)."""
        try:
            for p in self._procs:
                _kill_group(p, signal.SIGKILL)
            self._procs = []
            if self.network is not None:
                self.network.destroy()
                self.network = None
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the with-block still cleans up on exceptions

        def handler(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    # ---- running ranks -------------------------------------------------------------------------------------------
    def rank_env(self, rank: int, *, port: int | None = None) -> dict[str, str]:
        """The environment variables a rank gets (on top of the caller's), in a run on ``live_nodes``."""
        nodes = self.live_nodes
        node_rank = rank // self.ranks_per_node
        return {
            "RANK": str(rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(rank % self.ranks_per_node), "LOCAL_WORLD_SIZE": str(self.ranks_per_node),
            "NODE_RANK": str(node_rank), "GROUP_RANK": str(node_rank),
            "MASTER_ADDR": Network.address(nodes[0]), "MASTER_PORT": str(self.master_port if port is None else port),
            "GLOO_SOCKET_IFNAME": "eth0",
        }

    def run(self, command: Sequence[str], *, timeout: float, grace: float = 15.0, env: Mapping[str, str] | None = None,
            echo: IO[str] | None = None, kill: NodeKill | None = None, port: int | None = None) -> ClusterResult:
        """Start ``command`` once per rank inside its node (every node not lost) and wait for all ranks.

        Args:
            command: argv of each rank (the same for all; ranks tell themselves apart by RANK etc.).
            timeout: seconds for the whole run; then every rank is killed and ``timed_out`` is set.
            grace: seconds the other ranks get to exit on their own after the first rank fails (or a node is lost).
            env: extra environment variables for every rank.
            echo: a stream that receives every output line prefixed with ``[rank r]`` as it comes (None: quiet).
            kill: lose this node during the run (see ``NodeKill``); it is added to ``lost_nodes``.
            port: MASTER_PORT of this run (None: ``master_port``); a relaunch takes a fresh one.
        """
        if self.network is None:
            raise RuntimeError("EmulatedCluster.run needs the cluster to be entered (use it as a context manager)")
        if not command:
            raise ValueError("command is empty: give the program each rank runs")
        if timeout <= 0 or grace < 0:
            raise ValueError(f"timeout={timeout!r} must be > 0 and grace={grace!r} >= 0")
        nodes = self.live_nodes
        if not nodes:
            raise RuntimeError(f"every node of the cluster is lost ({sorted(self.lost_nodes)}): nothing to run on")
        if kill is not None and kill.node not in nodes:
            raise ValueError(f"kill.node={kill.node!r} is not a node of this run (live nodes {list(nodes)})")
        if port is not None and not 1024 <= port <= 65000:
            raise ValueError(f"port={port!r} must be in [1024, 65000]")
        world = self.world_size
        tails = [collections.deque(maxlen=TAIL_LINES) for _ in range(world)]
        lock = threading.Lock()
        seen = threading.Event()  # a rank printed kill.on_line
        readers = []
        start, started_at = time.monotonic(), time.time()
        procs: list[subprocess.Popen[bytes]] = []
        for rank in range(world):
            full_env = dict(os.environ)
            full_env.setdefault("OMP_NUM_THREADS", "1")
            full_env.update(env or {})
            full_env.update(self.rank_env(rank, port=port))
            ns = self.network.nodes[nodes[rank // self.ranks_per_node]]
            p = subprocess.Popen(["ip", "netns", "exec", ns, *command], env=full_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            self._procs.append(p)
            watch = (kill.on_line, seen) if kill is not None and kill.on_line is not None else None
            t = threading.Thread(target=_pump, args=(p.stdout, tails[rank], f"[rank {rank}] ", echo, lock, watch),
                                 daemon=True)
            t.start()
            readers.append(t)

        codes: list[int | None] = [None] * world
        ended: list[float | None] = [None] * world
        first_failure: int | None = None
        kill_at = start + timeout
        timed_out = False
        killed_s: float | None = None
        try:
            while any(c is None for c in codes):
                now = time.monotonic()
                if kill is not None and killed_s is None and (
                        seen.is_set() if kill.after_s is None else now - start >= kill.after_s):
                    self._lose_node(kill.node, [p for r, p in enumerate(procs)
                                                if nodes[r // self.ranks_per_node] == kill.node])
                    killed_s = time.monotonic() - start
                    kill_at = min(kill_at, time.monotonic() + grace)
                for rank, p in enumerate(procs):
                    if codes[rank] is None and p.poll() is not None:
                        codes[rank] = p.returncode
                        ended[rank] = now - start
                        if p.returncode != 0 and first_failure is None:
                            first_failure = rank
                            kill_at = min(kill_at, now + grace)
                if all(c is not None for c in codes):
                    break
                if now >= kill_at:
                    timed_out = first_failure is None
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    _kill_group(p, signal.SIGKILL)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                if p in self._procs:
                    self._procs.remove(p)
            for t in readers:
                t.join(timeout=2)
        elapsed = time.monotonic() - start
        ranks = tuple(
            RankResult(rank=r, node=nodes[r // self.ranks_per_node], returncode=codes[r], ended_s=ended[r],
                       output="".join(tails[r]))
            for r in range(world)
        )
        return ClusterResult(ranks=ranks, elapsed_s=elapsed, timed_out=timed_out, first_failure=first_failure,
                             started_at=started_at, nodes=nodes, killed_node=None if killed_s is None else kill.node,
                             killed_s=killed_s)

    def _lose_node(self, node: int, procs: list[subprocess.Popen[bytes]]) -> None:
        """Link down first (so the kills below send nothing to the others), then every process of the node."""
        if self.network is None:
            raise RuntimeError("the cluster is not up")
        self.lost_nodes.add(node)
        self.network.disconnect(node)
        for p in procs:
            _kill_group(p, signal.SIGKILL)
        kill_processes(self.network.nodes[node])

    def tx_bytes(self) -> list[int]:
        """Bytes each node has sent to the other nodes so far (its link's counter)."""
        if self.network is None:
            raise RuntimeError("the cluster is not up")
        return [self.network.tx_bytes(i) for i in range(self.spec.nodes)]


def _kill_group(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(stream: IO[bytes] | None, tail: "collections.deque[str]", prefix: str, echo: IO[str] | None,
          lock: threading.Lock, watch: tuple[str, threading.Event] | None = None) -> None:
    """Read a rank's output into ``tail`` (and ``echo``); set ``watch``'s event on the first line holding its text."""
    if stream is None:
        return
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        tail.append(line)
        if watch is not None and watch[0] in line:
            watch[1].set()
        if echo is not None:
            with lock:
                echo.write(prefix + line)
                echo.flush()
    stream.close()

