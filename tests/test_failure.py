"""A rank that dies or fails mid-step: the others stop within a bounded time with an error naming it.

The killed-rank test runs on the emulated cluster (SIGKILL, no goodbye: only the heartbeats can tell). The
failing-rank test runs plain local processes on loopback, so the watchdog is tested even without root.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from largeep_plugin.cluster import EXIT_RANK_LOST, EmulatedCluster, RankWatchdog
from largeep_plugin.tools.launch import free_port
from test_cluster import needs_netns

WORKER = [sys.executable, "-m", "largeep_plugin.cluster.layer_worker"]


@needs_netns
def test_killed_rank_is_named_by_every_survivor_within_the_timeout() -> None:
    timeout_s = 3.0
    cmd = WORKER + ["--steps", "100000", "--watchdog-timeout", str(timeout_s), "--die-rank", "3", "--die-step", "2"]
    with EmulatedCluster(2, 2, "1gbit", "0") as cluster:
        result = cluster.run(cmd, timeout=120, grace=30)
    assert result.ranks[3].returncode == -9 and result.first_failure == 3, result.summary()
    for r in result.ranks[:3]:
        # Exited on its own (not killed by the launcher after the grace) with the error naming the lost rank.
        assert r.returncode == EXIT_RANK_LOST, (r.rank, r.returncode, r.output)
        assert "RankLostError: rank 3 (node 1) lost: no heartbeat" in r.output, r.output
    # From the kill to the last survivor's exit: the heartbeat timeout + one interval (1 s here) + unwinding, with
    # room for a loaded machine; far below the launcher's 30 s grace.
    took = max(r.ended_s for r in result.ranks[:3]) - result.ranks[3].ended_s
    assert timeout_s - 1 <= took < timeout_s + 10, took  # the last heartbeat may precede the kill by an interval


def _local_world(args: list[str], world_size: int, ranks_per_node: int, timeout: float) -> tuple[list[int], list[str], float]:
    """Start ``world_size`` layer workers on loopback (no namespaces); returns exit codes, outputs, seconds."""
    port = free_port()
    procs = []
    t0 = time.monotonic()
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % ranks_per_node),
                   LOCAL_WORLD_SIZE=str(ranks_per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(WORKER + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            outs.append(out)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, outs, time.monotonic() - t0


def test_failing_rank_is_named_by_every_survivor() -> None:
    # The watchdog port is MASTER_PORT + 1; a free port's neighbour is free in practice on a test machine.
    codes, outs, _ = _local_world(
        ["--steps", "100000", "--watchdog-timeout", "20", "--die-rank", "2", "--die-step", "1", "--die-mode", "raise"],
        world_size=4, ranks_per_node=2, timeout=120,
    )
    assert codes[2] == 1 and "InjectedFault: injected fault on rank 2" in outs[2], outs[2]
    for rank in (0, 1, 3):
        assert codes[rank] == EXIT_RANK_LOST, (rank, codes, outs[rank])
        # Named at once from the failure the rank published, not after the 20 s heartbeat timeout.
        assert "rank 2 (node 1) lost: it failed: InjectedFault" in outs[rank], outs[rank]


def test_watchdog_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout_s=1"):
        RankWatchdog(rank=0, world_size=2, timeout_s=1, interval_s=1)
    with pytest.raises(ValueError, match="grace_s=-1"):
        RankWatchdog(rank=0, world_size=2, grace_s=-1)
    with pytest.raises(ValueError, match="rank=2"):
        RankWatchdog(rank=2, world_size=2)
