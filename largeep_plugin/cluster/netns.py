"""The network of an emulated cluster: one Linux network namespace per node, joined by a bridge, shaped with ``tc``.

    switch namespace  <prefix>-sw:   bridge br0, one port n<i> per node (tbf: the node's download bandwidth)
    node namespace    <prefix>-n<i>: loopback + eth0 = 10.77.0.<i+1>/24 (tbf: upload bandwidth; netem: latency)

Everything lives in namespaces this module creates (the host's own namespace gets no interface, address or route),
so traffic only flows between them. Ranks of one node share its namespace: they reach each other's addresses
through the kernel's local route, i.e. over loopback, unshaped. Traffic between nodes crosses two veth links and
the bridge, limited to ``bandwidth`` each way per node and delayed by ``latency`` once per direction.

Names are ``lep-<pid>-<random>-...`` so that concurrent runs never collide and a later run can remove what a killed
one left behind (``remove_leftovers``: namespaces whose creating process is gone).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

PREFIX = "lep"
SUBNET = "10.77.0"
NODE_IFACE = "eth0"
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-(sw|n\d+)$")

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


class ClusterUnavailable(RuntimeError):
    """The emulated cluster cannot run here (not root, no iproute2, no namespaces, a qdisc missing)."""


def parse_rate(text: str, field: str = "inter_bw") -> int:
    """'1gbit', '100mbit', '2.5gbit' -> bits per second (tc's units, decimal). ValueError naming ``field``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", str(text).lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"{field}={text!r} is not a rate like '1gbit', '100mbit' or '500kbit'")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if bits < 8000:
        raise ValueError(f"{field}={text!r} is below 8kbit")
    return bits


def parse_duration(text: str, field: str = "inter_latency") -> float:
    """'100us', '1ms', '0' -> seconds. ValueError naming ``field``."""
    s = str(text).strip().lower()
    if s in ("0", "0.0", "none"):
        return 0.0
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(s|ms|us|ns)", s)
    if not m:
        raise ValueError(f"{field}={text!r} is not a duration like '100us', '2ms' or '0'")
    seconds = float(m.group(1)) * _TIME_UNITS[m.group(2)]
    if seconds > 10:
        raise ValueError(f"{field}={text!r} is more than 10 s")
    return seconds


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can (checks root and iproute2, nothing else)."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the emulated cluster needs iproute2 ({' and '.join(missing)} not found on PATH)"
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces and tc); run as root or skip it"
    return None


def run_cmd(args: list[str]) -> str:
    """Run an iproute2 command; its error output becomes a RuntimeError."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _netns_names() -> list[str]:
    out = run_cmd(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_processes(name: str) -> None:
    """SIGKILL every process that runs inside namespace ``name`` (our ranks and whatever they started)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def delete_namespace(name: str) -> None:
    """Kill what still runs inside ``name`` (processes of our ranks) and delete it; its veths go with it."""
    kill_processes(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=30)


def remove_leftovers() -> list[str]:
    """Delete ``lep-<pid>-...`` namespaces whose creating process no longer exists; returns their names."""
    removed = []
    for name in _netns_names():
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    """Nodes and the inter-node link: ``bandwidth_bits`` per node and direction, ``latency_s`` one way."""

    nodes: int
    bandwidth_bits: int
    latency_s: float

    def __post_init__(self) -> None:
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= 250:
            raise ValueError(f"nodes={self.nodes!r} must be an integer in [1, 250]")


class Network:
    """Creates the namespaces, bridge, veths and qdiscs of ``spec``; ``destroy`` removes all of them."""

    def __init__(self, spec: NetworkSpec):
        self.spec = spec
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.nodes = [f"{self.tag}-n{i}" for i in range(spec.nodes)]
        self._created: list[str] = []

    @staticmethod
    def address(node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def create(self) -> None:
        """Build the network; on any failure remove what was built and raise ClusterUnavailable."""
        try:
            self._build()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            self.destroy()
            if isinstance(err, ClusterUnavailable):
                raise
            raise ClusterUnavailable(f"could not build the emulated network: {err}") from err

    def _build(self) -> None:
        for ns in [self.switch, *self.nodes]:
            run_cmd(["ip", "netns", "add", ns])
            self._created.append(ns)
            run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        run_cmd(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        run_cmd(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.nodes):
            port = f"n{i}"
            run_cmd(["ip", "link", "add", NODE_IFACE, "netns", ns, "type", "veth", "peer", "name", port,
                     "netns", self.switch])
            run_cmd(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
            run_cmd(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE])
            run_cmd(["ip", "-n", ns, "link", "set", NODE_IFACE, "up"])
            # Collectives come in bursts separated by compute: without this, TCP falls back to slow start after
            # every pause longer than its RTO, which an RDMA fabric never does.
            run_cmd(["ip", "netns", "exec", ns, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/tcp_slow_start_after_idle"])
            self._shape(ns, NODE_IFACE, latency=True)      # upload of node i (+ the one-way latency)
            self._shape(self.switch, port, latency=False)  # download of node i

    def _shape(self, ns: str, dev: str, latency: bool) -> None:
        rate_bytes = self.spec.bandwidth_bits / 8
        # veths hand tbf GSO packets of up to 64 KiB: the bucket must hold several, or tbf drops them.
        burst = int(max(256 * 1024, rate_bytes * 0.002))
        limit = int(max(4 * 2**20, rate_bytes * 0.05))
        run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                 "rate", f"{self.spec.bandwidth_bits}bit", "burst", str(burst), "limit", str(limit)])
        if latency and self.spec.latency_s > 0:
            delay_us = max(1, round(self.spec.latency_s * 1e6))
            try:
                run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                         "delay", f"{delay_us}us", "limit", "100000"])
            except RuntimeError as err:
                if "unknown" in str(err).lower():
                    raise ClusterUnavailable(
                        "this kernel has no netem qdisc (sch_netem), so inter-node latency cannot be emulated; "
                        "use an inter-node latency of 0 (bandwidth is still limited with tbf)"
                    ) from err
                raise

    def tx_bytes(self, node: int) -> int:
        """Bytes node ``node`` has sent over its inter-node link so far (its eth0 counter)."""
        out = run_cmd(["ip", "-n", self.nodes[node], "-j", "-s", "link", "show", "dev", NODE_IFACE])
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def disconnect(self, node: int) -> None:
        """Take node ``node``'s link down: nothing leaves or reaches it any more (a machine that lost power sends
        no goodbye, not even the TCP resets of its dying sockets)."""
        run_cmd(["ip", "-n", self.nodes[node], "link", "set", NODE_IFACE, "down"])

    def destroy(self) -> None:
        """Delete every namespace of this network (idempotent)."""
        for ns in reversed(self._created):
            delete_namespace(ns)
        self._created = []
