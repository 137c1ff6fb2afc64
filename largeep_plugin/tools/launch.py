"""Start a local world of ranks (one process each) on this machine: used by the demo, the benchmarks and the tests.

    results = run_world(fn, world_size=4, args=(cfg,), timeout=120)
    # fn(rank, world_size, *args) runs in every rank after torch.distributed is initialised (gloo by default);
    # results[r] is what rank r returned (it must be picklable).

A world never outlives its caller and never leaves the user guessing:
- a rank that dies or raises ends the world: ``WorldError`` names the rank that died first (its exit status or
  signal), then the ranks that failed after it, one line each; the full tracebacks are on the exception
  (``.tracebacks``) and in its message too when ``LARGEEP_VERBOSE=1``;
- a world that outlives ``timeout`` is killed and reported;
- SIGTERM or SIGHUP to the caller kills every rank, then raises ``WorldInterrupted``; when the caller dies
  without a word (SIGKILL), Linux kills its ranks (a parent-death signal each rank asks for at start).
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .rank_report import RankOutcome, describe_failure, error_outcome, signal_name

VERBOSE_ENV = "LARGEEP_VERBOSE"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class WorldError(RuntimeError):
    """A rank of a local world failed, died or timed out.

    Attributes:
        failed_rank: the rank blamed first (the first to die, else the first to raise), None on a timeout.
        tracebacks: {rank: full traceback} of every rank that raised.
        exit_codes: {rank: exit code} of every rank that ended without a result (negative: killed by -code).
    """

    def __init__(self, message: str, *, failed_rank: int | None = None, tracebacks: dict[int, str] | None = None,
                 exit_codes: dict[int, int | None] | None = None):
        super().__init__(message)
        self.failed_rank = failed_rank
        self.tracebacks = dict(tracebacks or {})
        self.exit_codes = dict(exit_codes or {})


class WorldInterrupted(WorldError):
    """The caller got SIGTERM or SIGHUP while a world ran; every rank was killed. ``signum``: the signal."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal_name(signum)}: every rank was stopped")
        self.signum = signum


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this rank when its parent dies: a parent killed by SIGKILL runs no clean-up, and an
    orphaned rank would train on to the end. A no-op off Linux or without a known parent (forkserver)."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request: the signal will never come
        os._exit(1)
def _before_fork() -> None:
    """Work every forked rank would otherwise repeat. torch imports a large part of itself (sympy included) lazily
    at the first backward that is given an output gradient: seconds of CPU per rank, 16 ranks sharing 2 cores.
    And ``gc.freeze`` keeps the parent's objects out of the ranks' garbage collections, which would otherwise walk
    (and copy, page by page) the whole inherited heap each time."""
    x = torch.ones(1, requires_grad=True)
    (x * 2).backward(torch.ones(1))
    gc.freeze()


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    collective_timeout: float,
    threads: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    report: multiprocessing.connection.Connection,
    parent_pid: int | None,
    cores: frozenset[int] | None = None,
) -> None:
    # A forked rank inherits the caller's handlers, which would raise WorldInterrupted here: a rank just ends.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    if cores is not None:
        # Before gloo starts its threads: they inherit the cores, so they wake on this rank's cores, not on
        # another rank's while it computes (a new rank has only this thread yet).
        os.sched_setaffinity(0, cores)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        out = fn(rank, world_size, *args)
        message: tuple[Any, ...] = ("ok", out)
    except BaseException as exc:  # report everything, KeyboardInterrupt included, then exit
        message = error_outcome(exc)
    try:
        try:
            # Plain pickle, by value: multiprocessing's own pickler would share tensors through file descriptors
            # that this rank, about to exit, could no longer serve when the caller reads them.
            report.send_bytes(pickle.dumps(message))
        except Exception as exc:  # an unpicklable result is this rank's error, not a silent death
            if message[0] != "ok":
                raise
            report.send_bytes(pickle.dumps(error_outcome(exc)))
    except (BrokenPipeError, OSError):
        pass  # the caller is gone: nobody to tell
    finally:
        report.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While a world runs, SIGTERM and SIGHUP raise ``WorldInterrupted`` in the caller, whose clean-up kills the
    ranks (the default action would end the caller at once and leave them running). Only in the main thread (the
    only one Python runs handlers in), and only where no one else handles the signal already."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise WorldInterrupted(signum)

    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    mine = [s for s, h in previous.items() if h in (signal.SIG_DFL, None)]
    for s in mine:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = 300.0,
    backend: str = "gloo",
    collective_timeout: float = 120.0,
    threads_per_rank: int = 1,
    start_method: str = "fork",
    grace: float = 5.0,
    pin_cores: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes and return the per-rank results.

    Args:
        fn: the rank's work; with the default ``fork`` start method it may be any callable, with ``spawn`` it
            must be importable (a module-level function).
        timeout: seconds for the whole world; past it every rank is killed and ``WorldError`` raised.
        collective_timeout: torch.distributed's own timeout for one collective.
        threads_per_rank: torch intra-op threads per rank (ranks share the machine's cores).
        grace: seconds the other ranks get, after the first rank fails or dies, to report before they are
            killed: a killed rank's peers fail within milliseconds, and waiting for them is what tells the rank
            that died from the ranks that merely lost it.
        pin_cores: where the cores this process may use give every rank ``threads_per_rank`` of its own, pin
            rank r (every thread of it, gloo's included) to the r-th such share, as a cluster launcher binds a rank
            to its own cores; otherwise nothing is pinned (the ranks share the cores as the scheduler sees fit).
    Raises:
        WorldError: a rank raised, died or the world timed out (see the module docstring).
        WorldInterrupted: SIGTERM or SIGHUP arrived (when called from the main thread).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    ctx = mp.get_context(start_method)
    port = free_port()
    usable = sorted(os.sched_getaffinity(0)) if pin_cores and hasattr(os, "sched_getaffinity") else []
    t = threads_per_rank
    cores_R = ([frozenset(usable[r * t:(r + 1) * t]) for r in range(world_size)]
               if 0 < world_size * t <= len(usable) else [None] * world_size)
    # The forkserver, not this process, is a rank's parent there: its death signal would follow the server.
    parent_pid = None if start_method == "forkserver" else os.getpid()
    procs: list[Any] = []
    readers: list[multiprocessing.connection.Connection] = []
    outcomes: dict[int, RankOutcome] = {}
    with _stop_on_signals():
        try:
            if start_method == "fork":
                _before_fork()
            try:
                for r in range(world_size):
                    reader, writer = ctx.Pipe(duplex=False)
                    p = ctx.Process(
                        target=_worker,
                        args=(r, world_size, port, backend, collective_timeout, threads_per_rank, fn, tuple(args),
                              writer, parent_pid, cores_R[r]),
                        daemon=True,
                    )
                    p.start()
                    # Created and closed per rank, so that only rank r holds its write end: its death is EOF here.
                    writer.close()
                    procs.append(p)
                    readers.append(reader)
            finally:
                gc.unfreeze()  # the parent's own collections go on as before
            outcomes = _collect(procs, readers, timeout, grace)
        finally:
            # Ranks that all returned get a moment to leave on their own; otherwise nothing is worth waiting for.
            _stop(procs, readers, wait_s=5.0 if len(outcomes) == world_size else 0.1)
    if all(o.ok for o in outcomes.values()) and len(outcomes) == world_size:
        return [outcomes[r].value for r in range(world_size)]
    for r, o in outcomes.items():
        if o.kind == "exited":
            o.exit_code = procs[r].exitcode
    raise _world_error(outcomes, world_size, timeout, grace)


def _collect(procs: list[Any], readers: list[multiprocessing.connection.Connection], timeout: float,
             grace: float) -> dict[int, RankOutcome]:
    """Outcomes of the ranks that ended, in the order they ended; stops at the timeout, or ``grace`` seconds after
    the first failure."""
    outcomes: dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(procs):
        now = time.monotonic()
        if now >= deadline:
            break
        pending = [r for r in range(len(procs)) if r not in outcomes]
        waitables = [readers[r] for r in pending] + [procs[r].sentinel for r in pending]
        ready = set(multiprocessing.connection.wait(waitables, timeout=min(deadline - now, 1.0)))
        for r in pending:
            if readers[r] not in ready and procs[r].sentinel not in ready:
                continue
            try:
                # A rank's report precedes its exit: a ready sentinel with nothing to read is a death.
                message = pickle.loads(readers[r].recv_bytes()) if readers[r].poll() else None
            except (EOFError, OSError):
                message = None
            outcomes[r] = RankOutcome.from_message(message, time.monotonic())
            if not outcomes[r].ok and deadline > time.monotonic() + grace:
                deadline = time.monotonic() + grace
    return outcomes


def _stop(procs: list[Any], readers: list[multiprocessing.connection.Connection], wait_s: float) -> None:
    """Kill every rank still running after ``wait_s`` seconds in all, and reap all of them."""
    until = time.monotonic() + wait_s
    for p in procs:
        p.join(timeout=max(0.0, until - time.monotonic()))
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)
    for reader in readers:
        reader.close()


def _world_error(outcomes: dict[int, RankOutcome], world_size: int, timeout: float, grace: float) -> WorldError:
    failed = [r for r, o in outcomes.items() if not o.ok]
    missing = [r for r in range(world_size) if r not in outcomes]
    if not failed:
        return WorldError(f"world of {world_size} ranks timed out after {timeout:g}s; no result from ranks {missing}")
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    message, blamed = describe_failure(outcomes, missing, world_size, grace, verbose=verbose, hint_env=VERBOSE_ENV)
    return WorldError(
        message, failed_rank=blamed,
        tracebacks={r: o.traceback for r, o in outcomes.items() if o.traceback},
        exit_codes={r: o.exit_code for r, o in outcomes.items() if o.kind == "exited"},
    )
