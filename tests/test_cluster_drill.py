"""The lost-node drill on the emulated cluster (``largeep cluster``): node 1 of two vanishes mid-run (the launcher
takes its link down and SIGKILLs its ranks), the survivors find out by themselves (heartbeat watchdog, exit code
75), the same command is relaunched on node 0 alone, plans a placement for one node, loads the last checkpoint and
trains on: its losses continue the curve of the run that never stopped on the same cluster shape (the same global
batches; 1e-6), the steps since the checkpoint are done again. Also: the kill options' refusals, and the CLI's
``--kill-node/--kill-at/--relaunch`` path with the launcher failing the world after ``--grace``.

Tests that build namespaces skip, with the reason, where that is impossible (not root, no iproute2).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from largeep_plugin.cluster import EXIT_RANK_LOST, EmulatedCluster, NodeKill, run_and_relaunch
from largeep_plugin.commands import cluster as cluster_command
from test_cluster import needs_netns, our_namespaces

STEPS, SAVE_EVERY, KILL_AT = 12, 2, 5
WORKER = [sys.executable, "-m", "largeep_plugin.cluster.train_worker", "--steps", str(STEPS),
          "--save-every", str(SAVE_EVERY)]


def test_node_kill_refusals_name_the_field() -> None:
    assert NodeKill.parse(1, "20s") == NodeKill(node=1, after_s=20.0)
    assert NodeKill.parse(0, "500ms").after_s == pytest.approx(0.5)
    assert NodeKill.parse(1, "line:step 5 start") == NodeKill(node=1, on_line="step 5 start")
    with pytest.raises(ValueError, match="kill_at='soon' is neither"):
        NodeKill.parse(1, "soon")
    with pytest.raises(ValueError, match="kill_at='line:' gives no text"):
        NodeKill.parse(1, "line:")
    with pytest.raises(ValueError, match="node=-1"):
        NodeKill(node=-1, after_s=1.0)
    with pytest.raises(ValueError, match="exactly one of after_s=1.0 and on_line='x'"):
        NodeKill(node=0, after_s=1.0, on_line="x")
    with pytest.raises(ValueError, match="after_s=-1"):
        NodeKill(node=0, after_s=-1)

    def flags(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"nodes": 2, "kill_node": None, "kill_at": None, "relaunch": False, **kw})

    assert cluster_command._node_kill(flags()) is None
    assert cluster_command._node_kill(flags(kill_node=1, kill_at="3s", relaunch=True)) == NodeKill(node=1, after_s=3.0)
    for bad, match in [(flags(kill_node=1), "--kill-node 1 and --kill-at None go together"),
                       (flags(relaunch=True), "--relaunch needs --kill-node"),
                       (flags(kill_node=2, kill_at="1s"), "--kill-node 2 is not a node of --nodes 2"),
                       (flags(nodes=1, kill_node=0, kill_at="1s", relaunch=True), "--relaunch needs a node left"),
                       (flags(kill_node=0, kill_at="later"), "--kill-at='later' is neither")]:
        with pytest.raises(ValueError, match=match):
            cluster_command._node_kill(bad)


def _read_log(path: str) -> list[dict]:
    """The log as runs: [{"start": record, "steps": {step: loss}}] in the order they started."""
    runs: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "start" in record:
                runs.append({"start": record, "steps": {}})
            else:
                runs[-1]["steps"][record["step"]] = record["loss"]
    return runs


def _worst(want: dict[int, float], got: dict[int, float]) -> float:
    assert got and set(got) <= set(want), (sorted(want), sorted(got))
    return max(abs(got[s] - want[s]) / abs(want[s]) for s in got)


@needs_netns
def test_a_lost_node_on_the_emulated_cluster_resumes_on_the_survivors_and_the_curve_goes_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    straight_log, log, ckpt = str(tmp_path / "straight.jsonl"), str(tmp_path / "drill.jsonl"), str(tmp_path / "ckpt")
    with EmulatedCluster(2, 2, "1gbit", "0") as cluster:
        tag = cluster.network.tag
        straight = cluster.run([*WORKER, "--log", straight_log, "--checkpoint", str(tmp_path / "straight")],
                               timeout=300)
        assert straight.ok, straight.summary() + "\n" + "\n".join(r.output for r in straight.ranks)
        recovery = run_and_relaunch(cluster, [*WORKER, "--log", log, "--checkpoint", ckpt], timeout=300, grace=90,
                                    kill=NodeKill(node=1, on_line=f"step {KILL_AT} start"))
    assert our_namespaces(tag) == []          # torn down on the kill path too
    first, relaunch = recovery.first, recovery.relaunch
    outputs = "\n".join(r.output for r in first.ranks + (relaunch.ranks if relaunch else ()))
    assert first.killed_node == 1 and relaunch is not None, first.summary() + "\n" + outputs

    # The lost node's ranks were killed; the survivors found the loss themselves and named a rank of node 1.
    assert [r.returncode for r in first.ranks if r.node == 1] == [-9, -9], first.summary()
    survivors = [r for r in first.ranks if r.node == 0]
    assert [r.returncode for r in survivors] == [EXIT_RANK_LOST] * 2, first.summary() + "\n" + outputs
    assert all("(node 1) lost: no heartbeat" in r.output for r in survivors), outputs

    # The relaunch: node 0 only, a world of 2, every expert on it, each routing group on one node.
    assert relaunch.ok and relaunch.nodes == (0,) and len(relaunch.ranks) == 2, relaunch.summary() + "\n" + outputs
    want = _read_log(straight_log)[0]["steps"]
    assert sorted(want) == list(range(STEPS))
    before, after = _read_log(log)
    assert before["start"]["world"] == 4 and before["start"]["placement"] in ([[0], [1], [2], [3]],
                                                                             [[2], [3], [0], [1]])
    assert after["start"]["world"] == 2 and after["start"]["nodes"] == 1
    assert sorted(len(h) for h in after["start"]["placement"]) == [2, 2]
    assert sorted(e for h in after["start"]["placement"] for e in h) == [0, 1, 2, 3]

    # The curve: the steps before the loss and those after the relaunch are the run that never stopped.
    done = sorted(before["steps"])
    assert done == list(range(len(done))) and KILL_AT <= len(done) < STEPS, done   # cut short, at the kill
    begin = after["start"]["start"]
    assert begin % SAVE_EVERY == 0 and len(done) - SAVE_EVERY <= begin <= len(done), (begin, done)  # the last save
    assert sorted(after["steps"]) == list(range(begin, STEPS))
    worst = max(_worst(want, before["steps"]), _worst(want, after["steps"]))
    assert worst <= 1e-6, (want, before["steps"], after["steps"])

    events = recovery.events()
    assert len(events) == 6 and all(a[1] <= b[1] for a, b in zip(events, events[1:])), events
    print(f"\nlost-node drill on the emulated cluster: node 1 lost at step {len(done)}, resumed from step {begin}, "
          f"largest loss difference {worst:.1e}\n{recovery.report()}")


@needs_netns
def test_the_cli_loses_a_node_fails_the_world_after_the_grace_and_relaunches_on_the_survivor() -> None:
    # Every rank of the first run waits forever: the launcher must end the survivor after --grace; the relaunch (a
    # world of 1 on node 0) exits at once.
    script = ("import os, sys, time; print('ready', flush=True)\n"
              "if os.environ['WORLD_SIZE'] == '1': print('alone on', os.environ['MASTER_ADDR']); sys.exit(0)\n"
              "time.sleep(120)\n")
    proc = subprocess.run([sys.executable, "-m", "largeep_plugin.cli", "cluster", "run", "--nodes", "2",
                           "--ranks-per-node", "1", "--kill-node", "1", "--kill-at", "line:ready", "--relaunch",
                           "--grace", "1", "--timeout", "120", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "node 1 lost at" in out and "alone on 10.77.0.1" in out, out
    assert "relaunch: ok" in out and "were killed by the launcher after the grace" in out, out
    assert "| world failed (every rank of the first run had ended) |" in out, out
