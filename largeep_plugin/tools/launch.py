"""Start a local world of ranks (one process each) on this machine: used by the demo, the benchmarks and the tests.

    results = run_world(fn, world_size=4, args=(cfg,), timeout=120)
    # fn(rank, world_size, *args) runs in every rank after torch.distributed is initialised (gloo by default);
    # results[r] is what rank r returned (it must be picklable).

Any rank's exception is re-raised in the caller with that rank's traceback; a world that outlives ``timeout``
is killed and reported, never left hanging.
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


class WorldError(RuntimeError):
    """A rank of a local world failed, died or timed out."""


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    results: "mp.Queue[Any]",
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes and return the per-rank results.

    Args:
        fn: the rank's work; with the default ``fork`` start method it may be any callable, with ``spawn`` it
            must be importable (a module-level function).
        timeout: seconds for the whole world; past it every rank is killed and ``WorldError`` raised.
        collective_timeout: torch.distributed's own timeout for one collective.
        threads_per_rank: torch intra-op threads per rank (ranks share the machine's cores).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context(start_method)
    results: "mp.Queue[Any]" = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, backend, collective_timeout, threads_per_rank, fn, tuple(args), results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    if start_method == "fork":
        _before_fork()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()  # the parent's own collections go on as before
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise WorldError(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in out]
                    raise WorldError(f"world of {world_size} ranks timed out after {timeout:.0f}s; no result from ranks {missing}")
                continue
            if not ok:
                raise WorldError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
