"""Decode: time per output token (TPOT) at batch B and context S, tokens/s, and the physical floor.

One decode step runs every layer once for B new tokens, each attending to S cached tokens. Pipeline stages run
one after the other for a token (no micro-batch pipelining), so TPOT is the sum over all layers. Per layer, on
the busiest GPU, each part is a roofline (the slower of its bytes at the HBM rate and its FLOPs at the GEMM
rate):
- attention: its weights (1/tp of them) and the KV cache of its B/attn_dp sequences;
- routed experts: the weights of the local experts that at least one token chose (a small batch touches few
  of them), and the rows the busiest GPU receives;
- shared experts / dense FFN: 1/tp of their weights;
- communication: dispatch and combine all-to-alls, TP all-reduces, pipeline sends (latency dominated);
- efficiency.kernel_overhead_us per layer for launches and synchronisation.
The floor is the same sum with peak HBM bandwidth and peak FLOPs and no communication or overhead: no
implementation on this hardware can beat it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.costs import all_reduce_time, all_to_all_time, p2p_time
from largeep_plugin.perfmodel.layout import Layout, check_layout, experts_per_gpu, group_geometry
from largeep_plugin.perfmodel.memory import MemoryReport, decode_memory, kv_split
from largeep_plugin.perfmodel.specs import BYTES_PER_ELEMENT, ClusterSpec, ModelSpec
from largeep_plugin.perfmodel.workload import DecodeWorkload

DECODE_KEYS = ("attention weights", "KV-cache read", "expert weights+GEMMs", "dense FFN", "output layer",
               "all-to-all", "TP comm", "PP send", "overheads")


@dataclass(frozen=True, kw_only=True)
class DecodeResult:
    """tpot_s: seconds per decode step (= per output token of each sequence); floor_s: the physical floor of
    the same step; breakdown: seconds per step by part (sums to tpot_s)."""

    layout: Layout
    batch: int
    context: int
    tpot_s: float
    floor_s: float
    tokens_per_s: float
    breakdown: Mapping[str, float]
    memory: MemoryReport


def _roof(nbytes: float, nflops: float, bw: float, rate: float) -> float:
    return max(nbytes / bw, nflops / rate)


def simulate_decode(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: DecodeWorkload) -> DecodeResult:
    """Predict one decode step of `work` on `layout` (see the module doc)."""
    check_layout(layout, model, cluster)
    p, h = work.precision, model.hidden_size
    wb, ab = BYTES_PER_ELEMENT[p], 2
    seqs = math.ceil(work.batch / layout.attn_dp)  # sequences on the busiest attention rank
    eff = (cluster.memory_bytes_per_s, cluster.gemm_flops(p), cluster.attention_flops(p))
    peak = (cluster.gpu.hbm_bytes_per_s, cluster.gpu.peak_flops(p), cluster.gpu.peak_flops(p))
    parts = dict.fromkeys(DECODE_KEYS, 0.0)
    floor = 0.0
    _, tp_nodes = group_geometry(layout.tp, 1, cluster.gpus_per_node)
    kv_layer = seqs * flops.kv_cache_bytes_per_token(model, work.kv_precision) / model.num_layers * (
        work.context / kv_split(model, layout))
    for i in range(model.num_layers):
        # (bytes, flops) per part; the same numbers give the prediction and the floor.
        attn_w = flops.attention_params(model) / layout.tp
        attn = (attn_w * wb, 2.0 * seqs * attn_w)
        kv = (kv_layer, seqs * flops.attention_core_flops(model, work.context) / layout.tp)
        if model.is_moe_layer(i):
            dense_w = (flops.shared_expert_params(model) / layout.tp + flops.router_params(model))
            expert, rows = _expert_bytes_flops(model, layout, seqs, work.imbalance, wb)
        else:
            dense_w = flops.dense_ffn_params(model) / layout.tp
            expert, rows = (0.0, 0.0), 0.0
        dense = (dense_w * wb, 2.0 * seqs * dense_w)
        for key, (nb, nf), kind in (("attention weights", attn, 1), ("KV-cache read", kv, 2),
                                    ("expert weights+GEMMs", expert, 1), ("dense FFN", dense, 1)):
            parts[key] += _roof(nb, nf, eff[0], eff[kind])
            floor += _roof(nb, nf, peak[0], peak[kind])
        if model.is_moe_layer(i) and layout.ep > 1:
            per_node, _ = group_geometry(layout.ep, layout.etp, cluster.gpus_per_node)
            intra, inter = flops.remote_copy_fractions(layout.ep, per_node)
            one = all_to_all_time(cluster, rows * intra * h * ab, rows * inter * h * ab)
            parts["all-to-all"] += 2.0 * one
        if layout.tp > 1:
            blocks = 1 + (1 if (not model.is_moe_layer(i) or layout.etp > 1
                                or flops.shared_expert_params(model)) else 0)
            parts["TP comm"] += blocks * all_reduce_time(cluster, seqs * h * ab, layout.tp, inter=tp_nodes > 1)
        parts["overheads"] += cluster.efficiency.kernel_overhead_us * 1e-6
    if model.vocab_size:
        vh = model.vocab_size * h / layout.tp
        parts["output layer"] = _roof(vh * wb, 2.0 * seqs * vh, eff[0], eff[1])
        floor += _roof(vh * wb, 2.0 * seqs * vh, peak[0], peak[1])
    if layout.pp > 1:
        inter = layout.stage_size >= cluster.gpus_per_node
        parts["PP send"] = (layout.pp - 1) * p2p_time(cluster, seqs * h * ab, inter)
    tpot = sum(parts.values())
    return DecodeResult(layout=layout, batch=work.batch, context=work.context, tpot_s=tpot, floor_s=floor,
                        tokens_per_s=work.batch / tpot, breakdown=parts,
                        memory=decode_memory(model, cluster, layout, work))


def _expert_bytes_flops(model: ModelSpec, layout: Layout, seqs: int, imbalance: float,
                        wb: int) -> tuple[tuple[float, float], float]:
    """((weight bytes, FLOPs) of the routed experts on the busiest GPU, rows it receives) for one decode step.

    The EP group serves ep*etp/tp attention ranks, so seqs*ep*etp/tp tokens and k times as many copies. A
    GPU reads a local expert's weights only if a copy chose it: of n_local experts, n_local*(1-(1-1/slots)^copies)
    are touched on average (slots: expert replicas in the group); the busiest GPU touches at least one.
    """
    moe = model.moe
    if moe is None:
        return (0.0, 0.0), 0.0
    copies = seqs * layout.ep * layout.etp / layout.tp * moe.top_k
    n_local = experts_per_gpu(layout, model)
    slots = max(moe.num_experts, layout.ep)
    touched = n_local * (1.0 - (1.0 - 1.0 / slots) ** copies)
    touched = min(n_local, max(1.0, touched))
    per_expert = moe.matrices * model.hidden_size * moe.ffn_hidden_size / layout.etp
    imb = imbalance if layout.ep > 1 else 1.0
    rows = max(1.0, imb * copies / layout.ep) if layout.ep > 1 else copies
    return (touched * per_expert * wb, 2.0 * rows * per_expert), rows
