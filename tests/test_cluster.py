"""The emulated cluster: ranks in per-node namespaces, the layer across two of them, shaping, bounded runs and a
teardown that always happens (failure, timeout, exception, Ctrl-C, SIGTERM, leftovers of killed runs).

Tests that build namespaces skip, with the reason, where that is impossible (not root, no iproute2).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from largeep_plugin.cluster import ClusterUnavailable, EmulatedCluster, parse_duration, parse_rate, remove_leftovers
from largeep_plugin.cluster import netns


def _probe() -> str | None:
    try:
        with EmulatedCluster(1, 1):
            return None
    except ClusterUnavailable as err:
        return str(err)


REASON = _probe()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"emulated cluster unavailable: {REASON}")


def our_namespaces(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag)]


def test_rate_and_duration_parsing() -> None:
    assert parse_rate("1gbit") == 10**9 and parse_rate("2.5mbit") == 2_500_000 and parse_rate("800kbit") == 800_000
    assert parse_duration("100us") == pytest.approx(1e-4) and parse_duration("0") == 0.0 and parse_duration("2ms") == 0.002
    with pytest.raises(ValueError, match="inter_bw='1gb'"):
        parse_rate("1gb")
    with pytest.raises(ValueError, match="inter_latency='fast'"):
        parse_duration("fast")
    with pytest.raises(ValueError, match="ranks_per_node=0"):
        EmulatedCluster(2, 0)
    with pytest.raises(ValueError, match="nodes=0"):
        EmulatedCluster(0, 2)


def test_refuses_without_root_or_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    with pytest.raises(ClusterUnavailable, match="iproute2"):
        EmulatedCluster(2, 1).__enter__()
    monkeypatch.undo()
    if netns.shutil.which("ip") is None or netns.shutil.which("tc") is None:
        pytest.skip("iproute2 missing: the root check below cannot be reached")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterUnavailable, match="needs root"):
        EmulatedCluster(2, 1).__enter__()


@needs_netns
@pytest.mark.parametrize("groups", [[], ["--node-groups"]], ids=["ep-group", "node-and-rail-groups"])
def test_layer_runs_across_two_namespaces_and_matches_the_reference(groups: list[str]) -> None:
    cmd = [sys.executable, "-m", "largeep_plugin.cluster.layer_worker", "--dispatch", "hierarchical", "--chunks", "2",
           "--steps", "1", "--check", *groups]
    with EmulatedCluster(2, 2, "1gbit", "0") as cluster:
        tag = cluster.network.tag
        result = cluster.run(cmd, timeout=120)
        sent = cluster.tx_bytes()
    assert result.ok, result.summary() + "\n" + "\n".join(r.output for r in result.ranks)
    for r in result.ranks:
        assert "vs dense reference" in r.output and "(ok)" in r.output, r.output
    assert all(b > 10_000 for b in sent), sent  # both nodes really sent tokens over their link
    assert our_namespaces(tag) == []


@needs_netns
def test_ranks_environment_failure_timeout_and_exception_all_end_cleanly() -> None:
    show = ("import os; print('ENV', os.environ['RANK'], os.environ['NODE_RANK'], os.environ['LOCAL_RANK'], "
            "os.environ['MASTER_ADDR'], os.environ['GLOO_SOCKET_IFNAME'], os.stat('/proc/self/ns/net').st_ino)")
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(2, 2, "100mbit", "0") as cluster:
            tag = cluster.network.tag
            env = cluster.run([sys.executable, "-c", show], timeout=60)
            fail = cluster.run([sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['RANK'] == '2' else 0)"],
                               timeout=60)
            t0 = time.monotonic()
            slow = cluster.run(["sleep", "30"], timeout=1.5)
            slow_s = time.monotonic() - t0
            assert len(our_namespaces(tag)) == 3  # switch + 2 nodes, up while the cluster is
            raise RuntimeError("boom")
    assert our_namespaces(tag) == []

    assert env.ok
    rows = [r.output.split("ENV ")[1].split() for r in env.ranks]
    assert [(int(a), int(b), int(c)) for a, b, c, *_ in rows] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert {row[3] for row in rows} == {"10.77.0.1"} and {row[4] for row in rows} == {"eth0"}
    netns_of = [row[5] for row in rows]
    assert netns_of[0] == netns_of[1] != netns_of[2] == netns_of[3]  # one namespace per node

    assert not fail.ok and fail.first_failure == 2 and fail.exit_code == 3
    assert slow.timed_out and slow.exit_code == 124 and slow_s < 10


@needs_netns
def test_inter_node_link_is_rate_limited() -> None:
    # 2 MB from rank 0 to rank 1 over gloo: across nodes at 40 Mbit/s it cannot take less than 0.4 s.
    script = (
        "import time, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo'); x = torch.zeros(2**19)\n"
        "dist.barrier(); t = time.perf_counter()\n"
        "dist.send(x, 1) if dist.get_rank() == 0 else dist.recv(x, 0)\n"
        "dist.barrier(); print('SECONDS', time.perf_counter() - t)\n"
    )
    with EmulatedCluster(2, 1, "40mbit", "0") as cluster:
        result = cluster.run([sys.executable, "-c", script], timeout=60)
    assert result.ok, result.ranks[0].output
    seconds = float(result.ranks[1].output.split("SECONDS")[1].split()[0])
    assert seconds > 0.5 * (2**21 * 8) / 40e6, seconds


@needs_netns
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)], ids=["ctrl-c", "sigterm"])
def test_signal_tears_the_cluster_down(sig: int, code: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "largeep_plugin.cli", "cluster", "run", "--nodes", "2",
                             "--ranks-per-node", "1", "--", "sleep", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = f"{netns.PREFIX}-{proc.pid}-"
    try:
        # Deadlines that hold when every core is busy (they bound a failure; a passing run does not wait for them).
        deadline = time.monotonic() + 120
        while len(our_namespaces(tag)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(our_namespaces(tag)) == 3, "the cluster did not come up"
        time.sleep(0.5)  # the ranks are started
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert our_namespaces(tag) == []


@needs_netns
def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}-{dead.pid}-abc123-n0"
    live = f"{netns.PREFIX}-{os.getpid()}-fff000-n0"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = remove_leftovers()
        assert stale in removed and live not in removed
        assert our_namespaces(stale) == [] and our_namespaces(live) == [live]
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
