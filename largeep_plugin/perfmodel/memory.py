"""Does it fit: weights, gradients, optimizer state, activations and KV cache per GPU, against GPU memory.

Reported for the pipeline stage that needs the most. Assumptions (the doc lists them too):
- training keeps 16-bit weights (also under FP8 GEMMs), fp32 gradients (grad_reduce_bytes), and
  optimizer_bytes_per_param of master weights and Adam moments, sharded over the data-parallel replicas of each
  parameter when distributed_optimizer is on (attention over attn_dp, experts over dp);
- with 1F1B, stage s holds the activations of min(micro-batches, pp - s) micro-batches (times
  1 + (pp-1)/(pp*vpp) when interleaved); the output layer's fp32 logits are held for one micro-batch;
- decode holds weights in its precision and the KV cache of its sequences; activations are negligible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.layout import Layout, experts_per_gpu, stage_layers
from largeep_plugin.perfmodel.specs import BYTES_PER_ELEMENT, ClusterSpec, ModelSpec
from largeep_plugin.perfmodel.workload import DecodeWorkload, TrainingWorkload

GB = 1e9


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Bytes per GPU on the fullest stage. max_batch: the largest micro-batch (training, sequences per
    attention-DP rank) or batch (decode, sequences in all) that fits; 0 when even one sequence does not."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float
    reserve: float
    capacity: float
    max_batch: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def describe(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        parts = [f"weights {self.weights / GB:.1f}"]
        if self.gradients:
            parts.append(f"grads {self.gradients / GB:.1f}")
        if self.optimizer:
            parts.append(f"optimizer {self.optimizer / GB:.1f}")
        if self.activations:
            parts.append(f"activations {self.activations / GB:.1f}")
        if self.kv_cache:
            parts.append(f"KV {self.kv_cache / GB:.1f}")
        parts.append(f"reserve {self.reserve / GB:.1f}")
        return (f"{verdict}: {self.total / GB:.1f} GB of {self.capacity / GB:.0f} GB on stage {self.stage} "
                f"({', '.join(parts)} GB)")


def stage_params(model: ModelSpec, layout: Layout, stage: int) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of `stage` holds: dense ones split by tp, experts by ep and etp."""
    layers = stage_layers(layout, model)[stage]
    dense = 0.0
    expert = 0.0
    for i in layers:
        if model.is_moe_layer(i):
            dense += flops.attention_params(model) + flops.shared_expert_params(model) + flops.router_params(model)
            expert += experts_per_gpu(layout, model) * flops.expert_params(model) / layout.etp
        else:
            dense += flops.attention_params(model) + flops.dense_ffn_params(model)
    vh = model.vocab_size * model.hidden_size
    if stage == 0:
        dense += vh
    if stage == layout.pp - 1 and not (model.tie_embeddings and layout.pp == 1):
        dense += vh
    return dense / layout.tp, expert


def training_memory(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: TrainingWorkload) -> MemoryReport:
    """Training memory per GPU on the fullest stage, and the largest micro-batch that fits."""
    microbatches = max(1, work.global_batch // (work.micro_batch * layout.attn_dp))
    reports = [_training_stage(model, cluster, layout, work, s, microbatches) for s in range(layout.pp)]
    return max(reports, key=lambda r: r.total)


def _training_stage(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: TrainingWorkload, stage: int,
                    microbatches: int) -> MemoryReport:
    ab = 4 if work.precision == "fp32" else 2
    dense, expert = stage_params(model, layout, stage)
    params = dense + expert
    weights = params * ab
    grads = params * work.grad_reduce_bytes
    shard_dense = layout.attn_dp if work.distributed_optimizer else 1
    shard_expert = layout.dp if work.distributed_optimizer else 1
    optimizer = work.optimizer_bytes_per_param * (dense / shard_dense + expert / shard_expert)

    layers = stage_layers(layout, model)[stage]
    inflight = float(min(microbatches, layout.pp - stage))
    if layout.vpp > 1:
        inflight *= 1.0 + (layout.pp - 1) / (layout.pp * layout.vpp)
    tokens_per_seq = work.seq_len / layout.tp
    fp8 = work.precision == "fp8"
    per_seq = sum(flops.activation_bytes_per_token(model, i, work.recompute, ab, fp8) for i in layers)
    per_seq *= tokens_per_seq
    per_seq *= inflight
    if work.recompute == "full" and layers:
        per_seq += max(flops.activation_bytes_per_token(model, i, "none", ab, fp8) for i in layers) * tokens_per_seq
    if stage == layout.pp - 1:
        per_seq += 4.0 * model.vocab_size * tokens_per_seq  # fp32 logits of one micro-batch
    activations = per_seq * work.micro_batch
    reserve = cluster.efficiency.memory_reserve_GB * GB
    capacity = cluster.gpu.memory_bytes
    room = capacity - reserve - weights - grads - optimizer
    max_mb = int(math.floor(room / per_seq)) if room > 0 and per_seq > 0 else 0
    return MemoryReport(stage=stage, weights=weights, gradients=grads, optimizer=optimizer,
                        activations=activations, kv_cache=0.0, reserve=reserve, capacity=capacity,
                        max_batch=max(0, max_mb))


def kv_bytes_per_sequence_per_gpu(model: ModelSpec, layout: Layout, context: int, kv_precision: str,
                                  stage: int = 0) -> float:
    """KV-cache bytes one sequence of `context` tokens occupies on one GPU of `stage`: GQA splits kv heads
    over tp (replicating them when there are fewer than tp); MLA's latent is replicated over tp."""
    layers = len(stage_layers(layout, model)[stage])
    per_token_layer = flops.kv_cache_bytes_per_token(model, kv_precision) / model.num_layers
    return context * per_token_layer * layers / kv_split(model, layout)


def kv_split(model: ModelSpec, layout: Layout) -> int:
    """Ways the KV cache of one sequence is split over a TP group (GQA kv heads; MLA's latent is not split)."""
    a = model.attention
    return min(layout.tp, a.kv_heads) if a.kind == "gqa" else 1


def decode_memory(model: ModelSpec, cluster: ClusterSpec, layout: Layout, work: DecodeWorkload) -> MemoryReport:
    """Decode memory per GPU on the fullest stage, and the largest batch (sequences) that fits."""
    reports = []
    seqs = math.ceil(work.batch / layout.attn_dp)
    for s in range(layout.pp):
        dense, expert = stage_params(model, layout, s)
        weights = (dense + expert) * BYTES_PER_ELEMENT[work.precision]
        per_seq = kv_bytes_per_sequence_per_gpu(model, layout, work.context, work.kv_precision, s)
        reserve = cluster.efficiency.memory_reserve_GB * GB
        room = cluster.gpu.memory_bytes - reserve - weights
        max_b = int(math.floor(room / per_seq)) * layout.attn_dp if room > 0 and per_seq > 0 else 0
        if per_seq == 0 and room > 0:
            max_b = work.batch
        reports.append(MemoryReport(stage=s, weights=weights, gradients=0.0, optimizer=0.0, activations=0.0,
                                    kv_cache=per_seq * seqs, reserve=reserve, capacity=cluster.gpu.memory_bytes,
                                    max_batch=max(0, max_b)))
    worst = max(reports, key=lambda r: r.total)
    return replace(worst, max_batch=min(r.max_batch for r in reports))
