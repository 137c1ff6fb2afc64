"""Parallel layouts: parse "ep16", "tp8pp2", "tp2pp8ep64dp2vpp4" and check them against a model and a cluster.

Dimensions (each at most once, any order, each >= 1, missing ones are 1):
    tp   tensor parallel size of attention (and of dense FFNs and shared experts), with sequence parallelism
    pp   pipeline stages;  vpp: virtual (interleaved) stages per pipeline rank
    ep   expert parallel size: the routed experts of a layer are split over ep GPUs
    etp  tensor parallel size inside an expert (default: tp when ep == 1, as in Megatron's classic TP-sharded
         MoE; otherwise 1)
    dp   replicas of the whole expert set (expert data parallel)

Per pipeline stage the GPUs hold ep * etp * dp expert shards, and the same GPUs hold tp * attn_dp attention
shards, so world = pp * ep * etp * dp and attn_dp = ep * etp * dp / tp (Megatron's "MoE parallel folding").
Rank order inside a stage: tp (attention) and etp (experts) innermost, then ep, then dp; stages are contiguous
blocks of ranks. Nodes hold consecutive ranks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from largeep_plugin.perfmodel.specs import ClusterSpec, ModelSpec

DIMENSIONS = ("tp", "pp", "ep", "etp", "dp", "vpp")
_TOKEN = re.compile(r"(etp|vpp|tp|pp|ep|dp)(\d+)")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A parallel layout; build it with parse_layout(text) or directly."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for name in DIMENSIONS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layout {name}={value!r} must be an integer >= 1")
        if (self.ep * self.etp * self.dp) % self.tp:
            raise ValueError(
                f"layout {self.name!r}: tp={self.tp} must divide ep*etp*dp={self.ep * self.etp * self.dp} "
                "(the attention and expert shards of a pipeline stage live on the same GPUs)")

    @property
    def world(self) -> int:
        """GPUs the layout uses."""
        return self.pp * self.ep * self.etp * self.dp

    @property
    def stage_size(self) -> int:
        """GPUs per pipeline stage."""
        return self.ep * self.etp * self.dp

    @property
    def attn_dp(self) -> int:
        """Data-parallel replicas of attention inside a stage (Megatron's DP size)."""
        return self.stage_size // self.tp

    @property
    def name(self) -> str:
        parts = [f"{d}{getattr(self, d)}" for d in ("tp", "pp", "ep", "etp", "dp", "vpp")
                 if getattr(self, d) > 1 and not (d == "etp" and self.etp == _default_etp(self.tp, self.ep))]
        return "".join(parts) or "single"


def _default_etp(tp: int, ep: int) -> int:
    return tp if ep == 1 else 1


def parse_layout(text: str) -> Layout:
    """Parse "ep16", "tp8pp2", "tp2ep8", "ep16dp2", "tp2pp8ep64dp2vpp4", ... into a Layout.

    Raises ValueError naming the offending part for anything else (unknown dimension, repeated dimension,
    zero, trailing text).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"layout={text!r} must be a non-empty string like 'ep16' or 'tp8pp2'")
    s = text.strip().lower().replace("x", "").replace("-", "").replace("_", "")
    values: dict[str, int] = {}
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            raise ValueError(f"layout={text!r}: cannot read {s[pos:]!r}; expected dimensions from "
                             f"{list(DIMENSIONS)} each followed by a size, e.g. 'tp8pp2' or 'ep16dp2'")
        name, size = m.group(1), int(m.group(2))
        if name in values:
            raise ValueError(f"layout={text!r}: dimension {name!r} appears twice")
        if size < 1:
            raise ValueError(f"layout={text!r}: {name}{size} must be >= 1")
        values[name] = size
        pos = m.end()
    tp, ep = values.get("tp", 1), values.get("ep", 1)
    values.setdefault("etp", _default_etp(tp, ep))
    return Layout(**values)


def check_layout(layout: Layout, model: ModelSpec, cluster: ClusterSpec) -> None:
    """Raise ValueError if `layout` cannot run `model` on `cluster`, naming the constraint that fails."""
    a, moe = model.attention, model.moe
    if layout.world != cluster.num_gpus:
        raise ValueError(
            f"layout {layout.name!r} needs {layout.world} GPUs (pp{layout.pp} x ep{layout.ep} x etp{layout.etp} "
            f"x dp{layout.dp}) but cluster {cluster.name!r} has {cluster.num_gpus} "
            f"({cluster.nodes} nodes x {cluster.gpus_per_node})")
    if a.num_heads % layout.tp:
        raise ValueError(f"layout {layout.name!r}: attention.num_heads={a.num_heads} is not divisible by "
                         f"tp={layout.tp}")
    if a.kind == "gqa" and a.kv_heads % layout.tp and layout.tp % a.kv_heads:
        raise ValueError(f"layout {layout.name!r}: attention.num_kv_heads={a.kv_heads} and tp={layout.tp} must "
                         "divide one another (kv heads are split, or replicated when fewer than tp)")
    if model.num_layers < layout.pp * layout.vpp:
        raise ValueError(f"layout {layout.name!r}: num_layers={model.num_layers} is fewer than "
                         f"pp*vpp={layout.pp * layout.vpp} pipeline chunks")
    if layout.vpp > 1 and layout.pp == 1:
        raise ValueError(f"layout {layout.name!r}: vpp={layout.vpp} needs pp > 1")
    if moe is None:
        if layout.ep > 1 or layout.etp != layout.tp:
            raise ValueError(f"layout {layout.name!r}: model {model.name!r} has no experts, so ep must be 1")
        return
    if moe.num_experts % layout.ep and layout.ep % moe.num_experts:
        raise ValueError(f"layout {layout.name!r}: ep={layout.ep} and moe.num_experts={moe.num_experts} must "
                         "divide one another (experts split evenly, or replicated evenly when ep > experts)")
    if moe.ffn_hidden_size % layout.etp:
        raise ValueError(f"layout {layout.name!r}: moe.ffn_hidden_size={moe.ffn_hidden_size} is not divisible "
                         f"by etp={layout.etp}")


def experts_per_gpu(layout: Layout, model: ModelSpec) -> float:
    """Routed experts whose weights a GPU holds per MoE layer (a fraction 1/etp of each)."""
    if model.moe is None:
        return 0
    e = model.moe.num_experts
    return max(1, e // layout.ep) if layout.ep <= e else 1


def stage_layers(layout: Layout, model: ModelSpec) -> list[list[int]]:
    """Layer indices per pipeline stage, spread as evenly as possible (earlier stages take the remainder)."""
    base, extra = divmod(model.num_layers, layout.pp)
    out, start = [], 0
    for s in range(layout.pp):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def group_geometry(size: int, stride: int, gpus_per_node: int) -> tuple[int, int]:
    """(members per node, nodes spanned) of a group of `size` ranks spaced `stride` apart in rank order."""
    if size <= 1:
        return 1, 1
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    nodes = -(-size // per_node)
    return per_node, nodes
