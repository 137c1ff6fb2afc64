"""Seconds for one primitive on a cluster: a GEMM (roofline), a memory-bound kernel, and the collectives.

Every function takes the effective rates from ClusterSpec (peak x efficiency, or measured values after
calibration), so calibrating the cluster calibrates every formula that uses these.

Collective model: latency + bytes / bandwidth, with the latency of one small collective on the link class and
the per-GPU, per-direction bandwidth of that class. A group that spans nodes runs at the inter-node rate (each
GPU has its own NIC); a group inside one node at the NVLink rate.
"""
from __future__ import annotations

from largeep_plugin.perfmodel.specs import ClusterSpec


def gemm_time(cluster: ClusterSpec, precision: str, flops: float, nbytes: float) -> float:
    """Roofline time of a GEMM: the slower of its FLOPs at the GEMM rate and its bytes at the memory rate."""
    if flops <= 0:
        return 0.0
    return max(flops / cluster.gemm_flops(precision), nbytes / cluster.memory_bytes_per_s)


def memory_time(cluster: ClusterSpec, nbytes: float) -> float:
    """Time to stream `nbytes` through HBM (element-wise kernels, weight and KV reads)."""
    return max(0.0, nbytes) / cluster.memory_bytes_per_s


def all_to_all_time(cluster: ClusterSpec, intra_bytes: float, inter_bytes: float) -> float:
    """An all-to-all where the busiest GPU moves intra_bytes over NVLink and inter_bytes over its NIC; the two
    link classes run concurrently."""
    if intra_bytes <= 0 and inter_bytes <= 0:
        return 0.0
    inter = inter_bytes > 0
    return cluster.link_latency_s(inter) + max(intra_bytes / cluster.link_bytes_per_s(False),
                                               inter_bytes / cluster.link_bytes_per_s(True))


def all_reduce_time(cluster: ClusterSpec, nbytes: float, size: int, inter: bool) -> float:
    """Ring all-reduce of an `nbytes` tensor over `size` GPUs: 2 (n-1)/n of it crosses each GPU's link."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    return cluster.link_latency_s(inter) + 2.0 * (size - 1) / size * nbytes / cluster.link_bytes_per_s(inter)


def all_gather_time(cluster: ClusterSpec, nbytes: float, size: int, inter: bool) -> float:
    """All-gather (or reduce-scatter) whose full result is `nbytes`: (n-1)/n of it crosses each GPU's link."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    return cluster.link_latency_s(inter) + (size - 1) / size * nbytes / cluster.link_bytes_per_s(inter)


def p2p_time(cluster: ClusterSpec, nbytes: float, inter: bool) -> float:
    """One point-to-point send of `nbytes`."""
    if nbytes <= 0:
        return 0.0
    return cluster.link_latency_s(inter) + nbytes / cluster.link_bytes_per_s(inter)


def pipelined_time(dispatch: float, compute: float, combine: float, chunks: int) -> float:
    """dispatch -> compute -> combine cut into `chunks` chunks that pipeline: the network (dispatch and combine
    share it) and the compute each work through their share, and the first and last chunk cannot overlap.

        t = (d + x + o) / c + (c - 1) / c * max(d + o, x)

    c = 1 gives d + x + o (no overlap); c -> inf gives max(d + o, x) (perfect overlap).
    """
    c = max(1, chunks)
    return (dispatch + compute + combine) / c + (c - 1) / c * max(dispatch + combine, compute)
