"""``largeep cluster``: run a command on an emulated multi-node cluster on this machine (needs root and iproute2).

    largeep cluster run --nodes 2 --ranks-per-node 4 --inter-bw 1gbit --inter-latency 0 -- \\
        python -m largeep_plugin.cluster.layer_worker --dispatch hierarchical --chunks 4 --check
    largeep cluster run --nodes 2 --ranks-per-node 2 --kill-node 1 --kill-at "line:step 5 start" --relaunch -- \\
        python -m largeep_plugin.cluster.train_worker --checkpoint /tmp/drill/ckpt --log /tmp/drill/losses.jsonl
                                   # the lost-node drill: node 1 vanishes, the survivors go on from the checkpoint
    largeep cluster check          # can this machine host it? (root, iproute2, namespaces, netem)
    largeep cluster cleanup        # delete namespaces left behind by runs that were killed outright

Each node is a network namespace with its own address (10.77.0.<node+1>), nodes are joined by a bridge whose
links are limited to --inter-bw per node and direction and delayed by --inter-latency (netem; 0 when the kernel
has no netem). COMMAND runs once per rank inside its node with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
NODE_RANK, MASTER_ADDR (the first node), MASTER_PORT and GLOO_SOCKET_IFNAME set, so ``init_process_group("gloo")``
with the env:// rendezvous just works. Output lines are prefixed with ``[rank r]``. The namespaces are deleted
at the end, also on failure, timeout and Ctrl-C. Exit code: 0, the first failing rank's code, or 124 on timeout.

A lost node: --kill-node N --kill-at WHEN takes node N's link down and kills every process in it (SIGKILL), WHEN
seconds after the start ('20s', '500ms') or when a rank first prints a line containing TEXT ('line:TEXT'). The
other ranks must notice by themselves (a collective timeout, a heartbeat watchdog); after --grace they are killed.
With --relaunch, COMMAND then starts again on the nodes left (a smaller world, the first survivor as MASTER_ADDR,
MASTER_PORT + 2), where it must resume from its own checkpoint; the recovery timeline is printed (the launcher's
events, and the ranks' lines 'timeline: up|loaded|caught-up EPOCH') and the exit code is the relaunch's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from ..cluster import ClusterUnavailable, EmulatedCluster, NodeKill, remove_leftovers, run_and_relaunch, unavailable_reason
from .flags import int_at_least, number


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cluster", help="run a command on an emulated multi-node cluster (network namespaces + tc)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    r = sub.add_parser("run", help="run COMMAND once per rank inside per-node namespaces", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--nodes", type=int_at_least(1), required=True, help="number of nodes (namespaces)")
    r.add_argument("--ranks-per-node", type=int_at_least(1), required=True, help="ranks started in each node")
    r.add_argument("--inter-bw", default="1gbit", help="inter-node bandwidth per node and direction (default 1gbit)")
    r.add_argument("--inter-latency", default="0", help="one-way inter-node latency, e.g. 100us (default 0; needs netem)")
    r.add_argument("--timeout", type=number(0.0, above=True), default=600.0,
                   help="seconds before every rank is killed (default 600)")
    r.add_argument("--grace", type=number(0.0), default=15.0,
                   help="seconds the other ranks get to exit on their own after one fails (default 15)")
    r.add_argument("--port", type=int_at_least(1), default=29500,
                   help="rendezvous port on the first node (default 29500)")
    r.add_argument("--kill-node", type=int_at_least(0), default=None,
                   help="lose this node during the run (its link down, its processes killed); needs --kill-at")
    r.add_argument("--kill-at", default=None, metavar="WHEN",
                   help="when to lose it: seconds after the start ('20s', '500ms') or 'line:TEXT' (the first output "
                        "line of any rank that contains TEXT)")
    r.add_argument("--relaunch", action="store_true",
                   help="after the loss, run COMMAND again on the surviving nodes (it resumes from its checkpoint) "
                        "and print the recovery timeline")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sub.add_parser("check", help="say whether this machine can host the emulated cluster")
    sub.add_parser("cleanup", help="delete namespaces left behind by killed runs")
    return p


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "cluster_command", None)
    if action == "check":
        return _check()
    if action == "cleanup":
        return _cleanup()
    if action != "run":
        print("usage: largeep cluster {run,check,cleanup} ... (see largeep cluster --help)", file=sys.stderr)
        return 2
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("largeep cluster run: give the command after --, e.g. -- python train.py", file=sys.stderr)
        return 2
    try:
        cluster = EmulatedCluster(args.nodes, args.ranks_per_node, args.inter_bw, args.inter_latency,
                                  master_port=args.port)
        kill = _node_kill(args)
    except ValueError as err:
        print(f"largeep cluster run: {err}", file=sys.stderr)
        return 2
    try:
        with cluster:
            print(f"emulated cluster: {args.nodes} nodes x {args.ranks_per_node} ranks, inter-node {args.inter_bw} "
                  f"per node and direction, latency {args.inter_latency}", flush=True)
            if args.relaunch and kill is not None:
                recovery = run_and_relaunch(cluster, command, kill=kill, timeout=args.timeout, grace=args.grace,
                                            echo=sys.stdout)
            else:
                result = cluster.run(command, timeout=args.timeout, grace=args.grace, echo=sys.stdout, kill=kill)
    except ClusterUnavailable as err:
        print(f"largeep cluster: cannot build the emulated cluster here: {err}", file=sys.stderr)
        return 2
    if not (args.relaunch and kill is not None):
        print(f"largeep cluster: {result.summary()}", flush=True)
        return result.exit_code
    print(f"largeep cluster: first run: {recovery.first.summary()}", flush=True)
    if recovery.relaunch is None:
        print("largeep cluster: no node was lost (the run ended before the kill), nothing to relaunch", flush=True)
        return recovery.first.exit_code
    print(f"largeep cluster: relaunch: {recovery.relaunch.summary()}\nrecovery timeline:\n{recovery.report()}",
          flush=True)
    return recovery.relaunch.exit_code


def _node_kill(args: argparse.Namespace) -> NodeKill | None:
    """The --kill-node/--kill-at/--relaunch flags, checked against each other and --nodes (ValueError)."""
    if (args.kill_node is None) != (args.kill_at is None):
        raise ValueError(f"--kill-node {args.kill_node} and --kill-at {args.kill_at!r} go together: give both")
    if args.kill_node is None:
        if args.relaunch:
            raise ValueError("--relaunch needs --kill-node and --kill-at (a node to lose)")
        return None
    if args.kill_node >= args.nodes:
        raise ValueError(f"--kill-node {args.kill_node} is not a node of --nodes {args.nodes} (0 to {args.nodes - 1})")
    if args.relaunch and args.nodes < 2:
        raise ValueError(f"--relaunch needs a node left after the loss, got --nodes {args.nodes}")
    return NodeKill.parse(args.kill_node, args.kill_at, field="--kill-at")


def _check() -> int:
    reason = unavailable_reason()
    if reason is None:
        try:
            with EmulatedCluster(2, 1, "1gbit", "0"):
                pass
        except ClusterUnavailable as err:
            reason = str(err)
    if reason is not None:
        print(f"no: {reason}")
        return 1
    netem = _netem_available()
    print("yes: namespaces, bridge and tbf work" + ("; netem too (latency can be emulated)" if netem else
          "; no netem qdisc in this kernel, so --inter-latency must be 0"))
    return 0


def _netem_available() -> bool:
    try:
        with EmulatedCluster(2, 1, "1gbit", "1us"):
            return True
    except ClusterUnavailable:
        return False


def _cleanup() -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"nothing to do: {reason}")
        return 0
    try:
        removed = remove_leftovers()
    except (RuntimeError, subprocess.SubprocessError) as err:
        print(f"cleanup failed: {err}", file=sys.stderr)
        return 1
    print(f"removed {len(removed)} leftover namespace(s)" + (": " + ", ".join(removed) if removed else ""))
    return 0
