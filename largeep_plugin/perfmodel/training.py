"""Training step time, tokens/s, MFU and where the time goes, for one model, cluster, layout and workload.

Step = micro-batches x (time of the slowest pipeline stage per micro-batch)          [1F1B]
     + (pp - 1) / vpp x that stage time                                               [pipeline bubble]
     + data-parallel gradient reduce-scatter / parameter all-gather not hidden under the last backward
       / first forward
     + optimizer step (memory bound).
The stage time sums layer_time over its layers, plus the output layer on the last stage and the activation
sends between stages. The breakdown lists seconds per step on the busiest GPU; its entries sum to the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.costs import all_gather_time, all_reduce_time, gemm_time, memory_time, p2p_time
from largeep_plugin.perfmodel.layer import LayerTime, act_bytes, layer_time
from largeep_plugin.perfmodel.layout import Layout, check_layout, group_geometry, stage_layers
from largeep_plugin.perfmodel.memory import MemoryReport, stage_params, training_memory
from largeep_plugin.perfmodel.specs import BYTES_PER_ELEMENT, ClusterSpec, ModelSpec
from largeep_plugin.perfmodel.workload import TrainingWorkload

BREAKDOWN_KEYS = ("expert GEMMs", "attention GEMMs", "attention core", "dense FFN+router", "element-wise",
                  "output layer", "all-to-all (exposed)", "overlap slowdown", "TP comm", "PP send/recv",
                  "PP bubble", "DP sync (exposed)", "optimizer")


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    """Prediction for one layout. breakdown: seconds per step on the busiest GPU (sums to step_s);
    a2a_hidden_s: all-to-all time per step that overlap hid under compute."""

    layout: Layout
    step_s: float
    tokens_per_s: float
    flops_per_token: float
    tflops_per_gpu: float
    mfu: float
    microbatches: int
    imbalance: float
    breakdown: Mapping[str, float]
    a2a_hidden_s: float
    memory: MemoryReport

    @property
    def exposed_comm_s(self) -> float:
        b = self.breakdown
        return b["all-to-all (exposed)"] + b["TP comm"] + b["PP send/recv"] + b["DP sync (exposed)"]


def simulate_training(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: TrainingWorkload,
                      *, count_causal: bool | None = None) -> TrainingResult:
    """Predict one training step. count_causal: how attention FLOPs are counted for tokens/s -> TFLOP/s and MFU
    (None: as the model's attention is; False counts full S x S attention, as Megatron-Core 0.9 did)."""
    check_layout(layout, model, cluster)
    per_step = work.micro_batch * layout.attn_dp
    if work.global_batch % per_step:
        raise ValueError(f"training.global_batch={work.global_batch} must be a multiple of micro_batch x attn_dp "
                         f"= {work.micro_batch} x {layout.attn_dp} = {per_step} for layout {layout.name!r}")
    m = work.global_batch // per_step
    imbalance = work.imbalance if layout.ep > 1 else 1.0
    p, ab = work.precision, act_bytes(work.precision)
    tokens = float(work.micro_batch * work.seq_len)

    # Per-layer times are the same for every layer of a kind: compute one of each.
    cache: dict[bool, LayerTime] = {}
    stage_times, stage_parts = [], []
    stage_inter = layout.stage_size >= cluster.gpus_per_node
    for s, layers in enumerate(stage_layers(layout, model)):
        parts = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
        hidden = 0.0
        for i in layers:
            kind = model.is_moe_layer(i)
            if kind not in cache:
                cache[kind] = layer_time(model, cluster, layout, work, i, imbalance=imbalance)
            lt = cache[kind]
            parts["expert GEMMs"] += lt.expert_gemm
            parts["attention GEMMs"] += lt.attention_gemm
            parts["attention core"] += lt.attention_core
            parts["dense FFN+router"] += lt.dense_ffn
            parts["element-wise"] += lt.elementwise
            parts["all-to-all (exposed)"] += lt.a2a_exposed
            parts["overlap slowdown"] += lt.overlap_penalty
            parts["TP comm"] += lt.tp_comm
            hidden += lt.a2a_total - lt.a2a_exposed
        if s == layout.pp - 1 and model.vocab_size:
            vh = model.vocab_size * model.hidden_size / layout.tp
            parts["output layer"] = 3.0 * (gemm_time(cluster, p, 2.0 * tokens * vh, vh * BYTES_PER_ELEMENT[p])
                                           + memory_time(cluster, 3 * 4.0 * tokens * model.vocab_size / layout.tp))
        if layout.pp > 1:
            # Each micro-batch and virtual chunk: activations forward, their gradients backward. The
            # interleaved schedule overlaps these sends with compute, leaving only their latency.
            send = tokens * model.hidden_size * ab / layout.tp
            one = p2p_time(cluster, send, inter=stage_inter) if layout.vpp == 1 else cluster.link_latency_s(
                stage_inter)
            parts["PP send/recv"] = 2 * layout.vpp * one
        parts["_hidden"] = hidden
        stage_times.append(sum(v for k, v in parts.items() if k != "_hidden"))
        stage_parts.append(parts)

    crit = max(range(layout.pp), key=lambda s: stage_times[s])
    t_stage = stage_times[crit]
    breakdown = {k: m * v for k, v in stage_parts[crit].items() if k != "_hidden"}
    breakdown["PP bubble"] = (layout.pp - 1) / layout.vpp * t_stage

    dp_exposed, optimizer = _dp_and_optimizer(model, cluster, layout, work, crit, t_stage)
    breakdown["DP sync (exposed)"] = dp_exposed
    breakdown["optimizer"] = optimizer
    step = sum(breakdown.values())

    fpt = flops.training_flops_per_token(model, work.seq_len, count_causal)
    tokens_per_s = work.global_batch * work.seq_len / step
    tflops = tokens_per_s * fpt / layout.world
    return TrainingResult(layout=layout, step_s=step, tokens_per_s=tokens_per_s, flops_per_token=fpt,
                          tflops_per_gpu=tflops / 1e12, mfu=tflops / cluster.gpu.peak_flops(p), microbatches=m,
                          imbalance=imbalance, breakdown=breakdown,
                          a2a_hidden_s=m * stage_parts[crit]["_hidden"],
                          memory=training_memory(model, cluster, layout, work))


def _dp_and_optimizer(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: TrainingWorkload,
                      stage: int, t_stage: float) -> tuple[float, float]:
    """Exposed data-parallel synchronisation and the optimizer step of one GPU of `stage` (seconds).

    With the distributed optimizer, gradients are reduce-scattered during the last micro-batch's backward and
    parameters all-gathered during the first forward; only what does not fit under them is exposed. Without
    it, gradients are all-reduced during the last backward.
    """
    dense, expert = stage_params(model, layout, stage)
    g, wb = work.grad_reduce_bytes, act_bytes(work.precision)
    exposed_rs = exposed_ag = 0.0
    for params, size, stride in ((dense, layout.attn_dp, layout.tp), (expert, layout.dp, layout.ep * layout.etp)):
        _, nodes = group_geometry(size, stride, cluster.gpus_per_node)
        inter = nodes > 1
        if work.distributed_optimizer:
            exposed_rs += all_gather_time(cluster, params * g, size, inter)
            exposed_ag += all_gather_time(cluster, params * wb, size, inter)
        else:
            exposed_rs += all_reduce_time(cluster, params * g, size, inter)
    dp = max(0.0, exposed_rs - 2.0 / 3.0 * t_stage) + max(0.0, exposed_ag - 1.0 / 3.0 * t_stage)
    # Adam touches the fp32 master weights and both moments (read + write), the gradient and the 16-bit copy.
    state = work.optimizer_bytes_per_param
    per_param = 2.0 * state + g + wb
    shard_d = layout.attn_dp if work.distributed_optimizer else 1
    shard_e = layout.dp if work.distributed_optimizer else 1
    opt = memory_time(cluster, per_param * (dense / shard_d + expert / shard_e))
    return dp, opt
