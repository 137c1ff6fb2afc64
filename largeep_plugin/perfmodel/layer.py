"""Time of one transformer layer for one micro-batch on the busiest GPU of its pipeline stage, training.

T is the tokens of one attention data-parallel rank's micro-batch. With tensor parallelism and sequence
parallelism each of the tp GPUs of that rank holds T/tp of them between blocks, and:
- attention GEMMs: all T rows against 1/tp of the weights;
- routed experts: a GPU receives T*k*etp/tp * imbalance rows (the EP group's token copies spread over its
  ep*dp expert slots, the busiest slot taking `imbalance` times the mean) against 1/etp of each local
  expert, so its expert FLOPs are T*k/tp * 2*matrices*H*F * imbalance whatever ep and etp are;
- the all-to-all moves those received rows; the fraction that comes from other nodes follows from where the
  EP group's ranks sit (uniform routing), or from the distinct-node count for node-batched dispatch.
Backward = 2 x forward for GEMMs and element-wise kernels; the all-to-all runs once more each way.
"""
from __future__ import annotations

from dataclasses import dataclass

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.costs import (all_gather_time, all_to_all_time, gemm_time, memory_time,
                                            pipelined_time)
from largeep_plugin.perfmodel.layout import Layout, experts_per_gpu, group_geometry
from largeep_plugin.perfmodel.specs import BYTES_PER_ELEMENT, ClusterSpec, ModelSpec
from largeep_plugin.perfmodel.workload import TrainingWorkload


@dataclass(frozen=True, kw_only=True)
class MoEBlockTime:
    """The routed-expert part of one MoE layer, one micro-batch, busiest GPU (seconds).

    expert_fwd: expert GEMMs, forward. dispatch_fwd / combine_fwd: the two all-to-alls of the forward;
    dispatch_bwd / combine_bwd: those of the backward. a2a_total: all four. a2a_exposed: what the overlap
    mode leaves on the critical path. overlap_penalty: compute slowed by communication kernels running beside it.
    """

    expert_fwd: float
    dispatch_fwd: float
    combine_fwd: float
    dispatch_bwd: float
    combine_bwd: float
    a2a_exposed: float
    overlap_penalty: float

    @property
    def expert_total(self) -> float:
        return 3.0 * self.expert_fwd

    @property
    def a2a_total(self) -> float:
        return self.dispatch_fwd + self.combine_fwd + self.dispatch_bwd + self.combine_bwd

    @property
    def forward(self) -> float:
        """Forward time without overlap: dispatch + experts + combine."""
        return self.dispatch_fwd + self.expert_fwd + self.combine_fwd

    @property
    def total(self) -> float:
        return self.expert_total + self.a2a_exposed + self.overlap_penalty


@dataclass(frozen=True, kw_only=True)
class LayerTime:
    """One layer, one micro-batch, forward + backward (+ recompute), busiest GPU of the stage (seconds)."""

    attention_gemm: float
    attention_core: float
    dense_ffn: float
    expert_gemm: float
    elementwise: float
    a2a_total: float
    a2a_exposed: float
    tp_comm: float
    overlap_penalty: float

    @property
    def compute(self) -> float:
        return self.attention_gemm + self.attention_core + self.dense_ffn + self.expert_gemm + self.elementwise

    @property
    def total(self) -> float:
        return self.compute + self.a2a_exposed + self.tp_comm + self.overlap_penalty


def act_bytes(precision: str) -> int:
    """Bytes per activation element: 16-bit activations for 16-bit and FP8 training, 4 for fp32."""
    return 4 if precision == "fp32" else 2


def moe_block_time(model: ModelSpec, cluster: ClusterSpec, layout: Layout, *, tokens: float, precision: str,
                   overlap: str = "none", overlap_chunks: int = 1, dispatch: str = "flat",
                   imbalance: float = 1.0, other_fwd: float = 0.0, other_bwd: float = 0.0) -> MoEBlockTime:
    """Routed experts of one MoE layer for `tokens` tokens of one attention-DP rank (see the module doc).

    other_fwd / other_bwd: the rest of the layer's compute (attention, element-wise, shared experts) in the
    forward and the backward, which "cross_batch" overlap hides the all-to-all under.
    """
    moe, h = model.moe, model.hidden_size
    imb = imbalance if layout.ep > 1 else 1.0
    rows = tokens * moe.top_k * layout.etp / layout.tp * imb  # rows this GPU's expert slot receives
    n_local = experts_per_gpu(layout, model)
    f_shard = moe.ffn_hidden_size / layout.etp
    wb = BYTES_PER_ELEMENT[precision]
    ab = act_bytes(precision)
    rows_each = rows / n_local
    one_expert = gemm_time(cluster, precision,
                           flops=2.0 * rows_each * moe.matrices * h * f_shard,
                           nbytes=moe.matrices * h * f_shard * wb + rows_each * (2 * h + moe.matrices * f_shard) * ab)
    expert_fwd = n_local * one_expert

    d_f = o_f = d_b = o_b = 0.0
    if layout.ep > 1:
        per_node, ep_nodes = group_geometry(layout.ep, layout.etp, cluster.gpus_per_node)
        intra_frac, inter_frac = flops.remote_copy_fractions(layout.ep, per_node)
        if dispatch == "hierarchical" and ep_nodes > 1:
            # A token crosses to each remote node once, then fans out over NVLink to its experts there.
            inter_rows = rows / moe.top_k * flops.distinct_remote_nodes(moe.top_k, ep_nodes,
                                                                        moe.max_nodes_per_token)
            intra_rows = rows * (1.0 - 1.0 / layout.ep)
        else:
            inter_rows, intra_rows = rows * inter_frac, rows * intra_frac
        # FP8 training sends FP8 tokens in the forward dispatch; combine and all backward traffic are 16 bit.
        fwd_dispatch_bytes = 1 if precision == "fp8" else ab
        d_f = all_to_all_time(cluster, intra_rows * h * fwd_dispatch_bytes, inter_rows * h * fwd_dispatch_bytes)
        o_f = all_to_all_time(cluster, intra_rows * h * ab, inter_rows * h * ab)
        d_b = o_b = o_f
    comm = d_f + o_f + d_b + o_b
    if comm == 0.0 or overlap == "none":
        exposed = comm
    elif overlap == "chunked":
        fwd = pipelined_time(d_f, expert_fwd, o_f, overlap_chunks) - expert_fwd
        bwd = pipelined_time(d_b, 2.0 * expert_fwd, o_b, overlap_chunks) - 2.0 * expert_fwd
        exposed = fwd + bwd
    elif overlap == "cross_batch":
        # The forward of one micro-batch runs beside the backward of another, phase against phase (DualPipe,
        # Megatron's 1F1B A2A overlap): each communication phase of one hides under the compute phase of the
        # other that runs at the same time, and the longer of the two sets the pace.
        # Real schedules hide only part of what this pairing could (efficiency.cross_batch_overlap).
        x_b = 2.0 * expert_fwd
        ideal = (max(0.0, o_b - other_fwd) + max(0.0, d_f - x_b) + max(0.0, d_b - expert_fwd)
                 + max(0.0, o_f - other_bwd))
        exposed = comm - cluster.efficiency.cross_batch_overlap * (comm - ideal)
    else:
        raise ValueError(f"overlap={overlap!r} is not one of ['none', 'chunked', 'cross_batch']")
    penalty = cluster.efficiency.overlap_slowdown * (comm - exposed)
    return MoEBlockTime(expert_fwd=expert_fwd, dispatch_fwd=d_f, combine_fwd=o_f, dispatch_bwd=d_b,
                        combine_bwd=o_b, a2a_exposed=exposed, overlap_penalty=penalty)


def layer_time(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: TrainingWorkload, index: int,
               *, imbalance: float) -> LayerTime:
    """Layer `index` for one micro-batch of `work` (forward + backward + recompute), busiest GPU."""
    p, tp = work.precision, layout.tp
    tokens = float(work.micro_batch * work.seq_len)
    ab, wb = act_bytes(p), BYTES_PER_ELEMENT[p]
    passes = 3.0 + (1.0 if work.recompute == "full" else 0.0)
    h = model.hidden_size

    def dense_gemm(params: float, rows: float) -> float:
        return gemm_time(cluster, p, 2.0 * rows * params, params * wb + rows * 4 * h * ab)

    attn_gemm = passes * dense_gemm(flops.attention_params(model) / tp, tokens)
    if work.recompute == "selective":
        # MLA's up-projections are recomputed in the backward instead of keeping q, k, v.
        attn_gemm += dense_gemm(flops.attention_up_projection_params(model) / tp, tokens)
    core_fwd = tokens / tp * flops.attention_core_flops(model, flops.mean_keys(model, work.seq_len))
    core_passes = 3.0 + (1.0 if work.recompute in ("selective", "full") else 0.0)
    attn_core = core_passes * core_fwd / cluster.attention_flops(p)
    is_moe = model.is_moe_layer(index)
    if is_moe:
        dense = passes * (dense_gemm(flops.shared_expert_params(model) / tp, tokens)
                          + dense_gemm(flops.router_params(model), tokens / tp))
    else:
        dense = passes * dense_gemm(flops.dense_ffn_params(model) / tp, tokens)
    ew_bytes = flops.elementwise_bytes_per_token(model, index, ab, fp8_gemms=(p == "fp8"))
    elementwise = (passes + (0.5 if work.recompute == "selective" else 0.0)) * memory_time(
        cluster, ew_bytes * tokens / tp)

    # TP with sequence parallelism: all-gather before and reduce-scatter after each TP-sharded block, forward
    # and backward. The attention block always is; the FFN block is when dense, shared or expert-TP sharded.
    tp_comm = 0.0
    if tp > 1:
        _, nodes = group_geometry(tp, 1, cluster.gpus_per_node)
        blocks = 1 + (1 if (not is_moe or layout.etp > 1 or model.moe.num_shared_experts) else 0)
        one = all_gather_time(cluster, tokens * h * ab, tp, inter=nodes > 1)
        tp_comm = blocks * 2 * (passes - 1.0) * one * (1.0 - work.tp_comm_overlap)

    expert = a2a_total = a2a_exposed = penalty = 0.0
    if is_moe:
        other = attn_gemm + attn_core + dense + elementwise
        block = moe_block_time(model, cluster, layout, tokens=tokens, precision=p, overlap=work.overlap,
                               overlap_chunks=work.overlap_chunks, dispatch=work.dispatch, imbalance=imbalance,
                               other_fwd=other / passes, other_bwd=other * (passes - 1.0) / passes)
        expert = block.expert_total * passes / 3.0
        a2a_total, a2a_exposed, penalty = block.a2a_total, block.a2a_exposed, block.overlap_penalty
        if work.recompute == "full":
            # The recomputed forward dispatches and combines again, without overlap.
            extra = block.dispatch_fwd + block.combine_fwd
            a2a_total += extra
            a2a_exposed += extra
    return LayerTime(attention_gemm=attn_gemm, attention_core=attn_core, dense_ffn=dense, expert_gemm=expert,
                     elementwise=elementwise, a2a_total=a2a_total, a2a_exposed=a2a_exposed, tp_comm=tp_comm,
                     overlap_penalty=penalty)
