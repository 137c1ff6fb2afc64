"""What is run: a training step (batch, sequence, precision, recompute, overlap) or a decode step (batch, context).

Frozen keyword-only dataclasses with strict validation, buildable from YAML sections with from_mapping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from largeep_plugin.perfmodel.specs import PRECISIONS

RECOMPUTE = ("none", "selective", "full")
OVERLAP = ("none", "chunked", "cross_batch")
DISPATCH = ("flat", "hierarchical")


@dataclass(frozen=True, kw_only=True)
class TrainingWorkload:
    """One optimizer step.

    seq_len: tokens per sequence. global_batch: sequences per step. micro_batch: sequences per micro-batch on one
    attention data-parallel rank. precision: of the GEMMs ("fp8": DeepSeek-style FP8 GEMMs, FP8 dispatch,
    16-bit combine). recompute: "none", "selective" (core attention and the expert activation), "full" (the
    whole layer, forward included). overlap: "none"; "chunked" (the MoE layer cuts its tokens into
    overlap_chunks chunks and pipelines dispatch, expert and combine, as this plugin's overlap scheduler does);
    "cross_batch" (all-to-all of one micro-batch runs under the compute of another, as DualPipe or Megatron's
    1F1B A2A overlap). dispatch: "flat" all-to-all, or "hierarchical" (a token crosses to a node once,
    deduplicated). imbalance: tokens on the busiest EP rank over the mean (>= 1); a load file sets it.
    tp_comm_overlap: fraction of the TP collectives hidden under GEMMs (0 = none).
    distributed_optimizer: optimizer state sharded over the data-parallel replicas (ZeRO-1).
    grad_reduce_bytes: bytes per gradient element in the DP reduction (4 = fp32, Megatron's default).
    optimizer_bytes_per_param: master weights and Adam moments (12 = fp32 x 3; 8 with bf16 moments).
    """

    seq_len: int
    global_batch: int
    micro_batch: int = 1
    precision: str = "bf16"
    recompute: str = "none"
    overlap: str = "none"
    overlap_chunks: int = 1
    dispatch: str = "flat"
    imbalance: float = 1.0
    tp_comm_overlap: float = 0.0
    distributed_optimizer: bool = True
    grad_reduce_bytes: int = 4
    optimizer_bytes_per_param: int = 12

    def __post_init__(self) -> None:
        for name in ("seq_len", "global_batch", "micro_batch", "overlap_chunks", "grad_reduce_bytes",
                     "optimizer_bytes_per_param"):
            _int_at_least(f"training.{name}", getattr(self, name), 1)
        _choice("training.precision", self.precision, PRECISIONS)
        _choice("training.recompute", self.recompute, RECOMPUTE)
        _choice("training.overlap", self.overlap, OVERLAP)
        _choice("training.dispatch", self.dispatch, DISPATCH)
        _imbalance("training.imbalance", self.imbalance)
        if not (0 <= self.tp_comm_overlap <= 1):
            raise ValueError(f"training.tp_comm_overlap={self.tp_comm_overlap!r} must be in [0, 1]")
        if self.overlap == "chunked" and self.overlap_chunks < 2:
            raise ValueError("training.overlap='chunked' needs training.overlap_chunks >= 2, got "
                             f"{self.overlap_chunks}")


@dataclass(frozen=True, kw_only=True)
class DecodeWorkload:
    """One decode step: `batch` sequences each produce one token attending to `context` cached tokens.

    precision: of weights and GEMMs; kv_precision: of the KV cache. imbalance and dispatch as for training.
    """

    batch: int
    context: int
    precision: str = "bf16"
    kv_precision: str = "bf16"
    imbalance: float = 1.0
    dispatch: str = "flat"

    def __post_init__(self) -> None:
        _int_at_least("decode.batch", self.batch, 1)
        _int_at_least("decode.context", self.context, 0)
        _choice("decode.precision", self.precision, PRECISIONS)
        _choice("decode.kv_precision", self.kv_precision, PRECISIONS)
        _choice("decode.dispatch", self.dispatch, DISPATCH)
        _imbalance("decode.imbalance", self.imbalance)


def _int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _imbalance(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name}={value!r} must be a number >= 1 (busiest rank's tokens over the mean)")
