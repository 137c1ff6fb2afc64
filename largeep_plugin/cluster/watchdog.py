"""Failure detection: when a rank dies mid-step, the others stop within a bounded time with an error naming it.

    with RankWatchdog(rank=rank, world_size=world, timeout_s=10):
        for step in range(steps):
            train_step()          # a collective that can never finish because rank 3 died ...
    # ... ends in RankLostError("rank 3 (node 1) lost: no heartbeat for 10.2 s ...") on every surviving rank

Design: a daemon thread per rank heartbeats into a side ``TCPStore`` (its own port, hosted by rank 0), never
touching the training collectives: the hot path pays nothing. Every ``interval_s`` the thread bumps its own counter
and reads everyone's; a rank whose counter has not moved for ``timeout_s`` (measured on this rank's monotonic
clock, so clocks need not agree) is lost. A rank that fails with an exception publishes it, so the others name it
at once; a rank that finishes cleanly says so and is not missed; the store host (rank 0) being unreachable means
rank 0 is lost.

When a rank is lost the thread prints the error, interrupts the main thread (a KeyboardInterrupt that the ``with``
block turns into ``RankLostError``) and, if the main thread is stuck inside a collective that will never return
(a peer that hangs rather than dies), ends the process after ``grace_s`` with exit code ``EXIT_RANK_LOST``. A dead
peer usually shows up first as a gloo error ("connection closed by peer"); the ``with`` block then waits up to
``timeout_s`` for the watchdog to say which rank it was. Worst case from the death to this rank's exit:
timeout_s + interval_s + grace_s.
"""
from __future__ import annotations

import _thread
import datetime
import os
import sys
import threading
import time
from types import TracebackType

import torch.distributed as dist

EXIT_RANK_LOST = 75


class RankLostError(RuntimeError):
    """Another rank of the job died, failed or stopped answering. ``lost_rank`` is its global rank."""

    def __init__(self, lost_rank: int, message: str):
        super().__init__(message)
        self.lost_rank = lost_rank


class RankWatchdog:
    """Heartbeat-based detection of a lost rank (see the module docstring).

    Args:
        rank, world_size: this process's global rank and the number of ranks.
        timeout_s: a rank silent this long is lost (> 2 * interval_s). Keep it well above the longest stall a
            healthy but overloaded rank can have (CPU oversubscription, a long GC pause).
        interval_s: heartbeat period.
        grace_s: after reporting, how long the main thread gets to unwind before the process exits.
        host, port: the side store (default: MASTER_ADDR and MASTER_PORT + 1).
        ranks_per_node: only to name the node in messages (default: LOCAL_WORLD_SIZE when set).
    """

    def __init__(self, *, rank: int, world_size: int, timeout_s: float = 30.0, interval_s: float = 1.0,
                 grace_s: float = 5.0, host: str | None = None, port: int | None = None,
                 ranks_per_node: int | None = None):
        if not timeout_s > 2 * interval_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must exceed 2 * interval_s={interval_s!r} > 0")
        if grace_s < 0:
            raise ValueError(f"grace_s={grace_s!r} must be >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.interval_s, self.grace_s = timeout_s, interval_s, grace_s
        self.host = host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.port = port if port is not None else int(os.environ.get("MASTER_PORT", "29500")) + 1
        env_rpn = os.environ.get("LOCAL_WORLD_SIZE")
        self.ranks_per_node = ranks_per_node or (int(env_rpn) if env_rpn else None)
        self.lost: RankLostError | None = None
        self._lost_event = threading.Event()
        self._stop = threading.Event()
        self._main_done = threading.Event()
        self._lock = threading.Lock()
        self._in_exit = False
        self._store: dist.TCPStore | None = None
        self._thread: threading.Thread | None = None

    # ---- lifetime ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "RankWatchdog":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            with self._lock:
                self._in_exit = True  # from here on the thread must not interrupt the main thread
        except KeyboardInterrupt:  # the interrupt the thread sent just before: the error is in self.lost
            self._in_exit = True
        if isinstance(exc, (RuntimeError, KeyboardInterrupt)) and self.lost is None and not isinstance(exc, RankLostError):
            # A failing collective is usually the first sign of a dead peer: give the watchdog time to name it.
            self._lost_event.wait(self.timeout_s + 2 * self.interval_s)
        self._main_done.set()
        if self.lost is not None:
            self._stop.set()
            raise self.lost from exc
        self._publish("fail" if exc is not None else "exit", repr(exc)[:300] if exc is not None else "done")
        if self.rank == 0 and exc is None:
            self._wait_for_others()  # rank 0 hosts the store: keep it up until everyone is through
        self.stop()

    def start(self) -> None:
        """Connect to (rank 0: host) the side store and start heartbeating. Blocks until all ranks connected."""
        self._store = dist.TCPStore(
            self.host, self.port, self.world_size, is_master=self.rank == 0,
            timeout=datetime.timedelta(seconds=max(60.0, self.timeout_s)), wait_for_workers=True,
        )
        for r in range(self.world_size):
            self._store.add(f"hb/{r}", 0)  # creates the key if missing, so reads never block
        self._thread = threading.Thread(target=self._loop, name="largeep-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)

    def check(self) -> None:
        """Raise ``RankLostError`` if a rank was lost (cheap, no communication: call it between steps)."""
        if self.lost is not None:
            raise self.lost

    # ---- the thread ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        assert self._store is not None
        store = self._store
        others = [r for r in range(self.world_size) if r != self.rank]
        last_value = {r: -1 for r in others}
        last_change = {r: time.monotonic() for r in others}
        finished: set[int] = set()
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if now - last_tick > self.timeout_s / 2:
                # This thread itself was starved: do not blame the others for our own stall.
                last_change = {r: now for r in others}
            last_tick = now
            try:
                store.add(f"hb/{self.rank}", 1)
                values = [int(v) for v in store.multi_get([f"hb/{r}" for r in others])]
                for r, v in zip(others, values):
                    if r in finished:
                        continue
                    if v != last_value[r]:
                        last_value[r], last_change[r] = v, now
                    elif now - last_change[r] > self.timeout_s:
                        if store.check([f"exit/{r}"]):
                            finished.add(r)
                            continue
                        self._report(r, f"no heartbeat for {now - last_change[r]:.1f} s (timeout {self.timeout_s:g} s)")
                        return
                failed = [r for r in others if r not in finished and store.check([f"fail/{r}"])]
                if failed:
                    r = failed[0]
                    self._report(r, f"it failed: {store.get(f'fail/{r}').decode(errors='replace')}")
                    return
            except (RuntimeError, OSError) as err:  # the store is gone: its host, rank 0, is
                if self._stop.is_set() or self.rank == 0:
                    return
                self._report(0, f"the watchdog store it hosts is unreachable ({type(err).__name__}: {err})")
                return

    def _report(self, lost: int, why: str) -> None:
        node = f" (node {lost // self.ranks_per_node})" if self.ranks_per_node else ""
        msg = f"rank {lost}{node} lost: {why}; rank {self.rank} stops"
        self.lost = RankLostError(lost, msg)
        self._lost_event.set()
        sys.stderr.write(f"[largeep watchdog] {msg}\n")  # one write: no other output lands mid-line
        sys.stderr.flush()
        with self._lock:
            if not self._in_exit:
                _thread.interrupt_main()  # unwinds Python code; a collective stuck in C++ needs the exit below
        if not self._main_done.wait(self.grace_s):
            print(f"[largeep watchdog] rank {self.rank}: still blocked {self.grace_s:g} s later, exiting with "
                  f"code {EXIT_RANK_LOST}", file=sys.stderr, flush=True)
            os._exit(EXIT_RANK_LOST)

    def _publish(self, kind: str, value: str) -> None:
        if self._store is None:
            return
        try:
            self._store.set(f"{kind}/{self.rank}", value)
        except (RuntimeError, OSError):
            pass  # the store host is gone; the others learn it from their own watchdogs

    def _wait_for_others(self) -> None:
        assert self._store is not None
        deadline = time.monotonic() + self.timeout_s
        keys = [r for r in range(1, self.world_size)]
        while time.monotonic() < deadline and not self.lost:
            if all(self._store.check([f"exit/{r}"]) or self._store.check([f"fail/{r}"]) for r in keys):
                return
            time.sleep(min(0.1, self.interval_s))
