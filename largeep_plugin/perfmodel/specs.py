"""What the performance model is told: the model's shape, the cluster's hardware, and how to read them from YAML.

Files use human units (TFLOP/s, TB/s, GB/s, GB, microseconds) because people write them; the dataclasses convert
to SI (FLOP/s, bytes/s, bytes, seconds) in properties, and every formula uses the SI properties only.

Validation is strict and happens once, at construction: an unknown key, a wrong type or an impossible value
(zero bandwidth, heads that do not divide, an efficiency above 1) is a ValueError that names the field and value.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from largeep_plugin.placement.files import read_yaml

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
ACTIVATIONS = ("gelu", "swiglu")
ATTENTION_KINDS = ("gqa", "mla")
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


# ---- model -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """Self-attention of one layer.

    kind "gqa" covers MHA (num_kv_heads == num_heads, or 0 meaning the same), GQA and MQA and uses head_dim.
    kind "mla" is DeepSeek's multi-head latent attention and uses the five *_rank / *_head_dim fields.
    causal: a token attends to the tokens before it only, so a training sequence of S tokens costs S/2 keys
    per query on average.
    """

    kind: str = "gqa"
    num_heads: int
    head_dim: int = 0
    num_kv_heads: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    causal: bool = True

    def __post_init__(self) -> None:
        _one_of("attention.kind", self.kind, ATTENTION_KINDS)
        _at_least("attention.num_heads", self.num_heads, 1)
        for name in ("head_dim", "num_kv_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim"):
            _at_least(f"attention.{name}", getattr(self, name), 0)
        if self.kind == "gqa":
            _at_least("attention.head_dim", self.head_dim, 1)
            kv = self.kv_heads
            if self.num_heads % kv:
                raise ValueError(f"attention.num_kv_heads={kv} must divide attention.num_heads={self.num_heads}")
        else:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                _at_least(f"attention.{name}", getattr(self, name), 1)

    @property
    def kv_heads(self) -> int:
        """Key/value heads of a GQA layer (num_kv_heads, or num_heads when 0)."""
        return self.num_kv_heads or self.num_heads


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """The MoE FFN of one layer: E routed experts of hidden F, top-k routing, optional shared experts.

    max_nodes_per_token: node-limited routing (DeepSeek-V3 uses 4): a token's experts lie on at most this many
    nodes; 0 means unlimited.
    """

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    activation: str = "swiglu"
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int = 0
    max_nodes_per_token: int = 0

    def __post_init__(self) -> None:
        _at_least("moe.num_experts", self.num_experts, 1)
        _at_least("moe.ffn_hidden_size", self.ffn_hidden_size, 1)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}")
        _one_of("moe.activation", self.activation, ACTIVATIONS)
        _at_least("moe.num_shared_experts", self.num_shared_experts, 0)
        _at_least("moe.max_nodes_per_token", self.max_nodes_per_token, 0)
        if self.num_shared_experts and self.shared_ffn_hidden_size < 1:
            raise ValueError(f"moe.shared_ffn_hidden_size={self.shared_ffn_hidden_size} must be >= 1 "
                             f"when moe.num_shared_experts={self.num_shared_experts}")

    @property
    def matrices(self) -> int:
        """Weight matrices per expert: GELU has fc1 and fc2, SwiGLU has gate, up and down."""
        return 3 if self.activation == "swiglu" else 2


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A decoder-only transformer: num_layers layers, the first num_dense_layers with a dense FFN of
    dense_ffn_hidden_size and `activation`, the rest MoE. Without a moe section every layer is dense (a dense
    model, used to calibrate against published dense numbers). vocab_size 0 leaves out the embedding and the
    output layer (for a model described without them)."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int = 0
    tie_embeddings: bool = False
    num_dense_layers: int = 0
    dense_ffn_hidden_size: int = 0
    activation: str = "swiglu"
    attention: AttentionSpec
    moe: MoESpec | None = None

    def __post_init__(self) -> None:
        _at_least("hidden_size", self.hidden_size, 1)
        _at_least("num_layers", self.num_layers, 1)
        _at_least("vocab_size", self.vocab_size, 0)
        _one_of("activation", self.activation, ACTIVATIONS)
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(f"num_dense_layers={self.num_dense_layers} must be between 0 and "
                             f"num_layers={self.num_layers}")
        if self.moe is None and self.num_dense_layers not in (0, self.num_layers):
            raise ValueError(f"num_dense_layers={self.num_dense_layers} needs a moe section for the other layers")
        if self.num_moe_layers < self.num_layers and self.dense_ffn_hidden_size < 1:
            raise ValueError(f"dense_ffn_hidden_size={self.dense_ffn_hidden_size} must be >= 1 "
                             f"when the model has dense layers")

    def is_moe_layer(self, index: int) -> bool:
        """Layer `index` (0-based) is an MoE layer; the first num_dense_layers are dense."""
        return self.moe is not None and index >= self.num_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return 0 if self.moe is None else self.num_layers - self.num_dense_layers

    @property
    def dense_matrices(self) -> int:
        """Weight matrices of a dense FFN: GELU has fc1 and fc2, SwiGLU has gate, up and down."""
        return 3 if self.activation == "swiglu" else 2


# ---- hardware --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GPUSpec:
    """One accelerator: dense peak per precision (no sparsity), HBM bandwidth and capacity."""

    name: str
    peak_TFLOPs: Mapping[str, float]
    hbm_TB_per_s: float
    memory_GB: float

    def __post_init__(self) -> None:
        if not self.peak_TFLOPs:
            raise ValueError("gpu.peak_TFLOPs must name at least one precision, e.g. {bf16: 989}")
        for key, value in self.peak_TFLOPs.items():
            _one_of("gpu.peak_TFLOPs key", key, PRECISIONS)
            _positive_number(f"gpu.peak_TFLOPs.{key}", value)
        _positive_number("gpu.hbm_TB_per_s", self.hbm_TB_per_s)
        _positive_number("gpu.memory_GB", self.memory_GB)

    def peak_flops(self, precision: str) -> float:
        """Dense peak in FLOP/s for a precision; fp16 and bf16 stand in for each other (same tensor cores)."""
        for key in (precision, {"fp16": "bf16", "bf16": "fp16"}.get(precision, "")):
            if key in self.peak_TFLOPs:
                return float(self.peak_TFLOPs[key]) * 1e12
        raise ValueError(f"precision={precision!r}: gpu {self.name!r} has no peak_TFLOPs entry for it "
                         f"(it has {sorted(self.peak_TFLOPs)})")

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_TB_per_s * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_GB * 1e9


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A link class, per GPU and per direction: bandwidth, and the latency of one small collective on it."""

    bandwidth_GB_per_s: float
    latency_us: float

    def __post_init__(self) -> None:
        _positive_number("bandwidth_GB_per_s", self.bandwidth_GB_per_s)
        if not (math.isfinite(self.latency_us) and self.latency_us >= 0):
            raise ValueError(f"latency_us={self.latency_us!r} must be a finite number >= 0")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_GB_per_s * 1e9

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True, kw_only=True)
class EfficiencySpec:
    """Fractions of the peaks that real kernels sustain, and the overheads no formula derives.

    gemm: per precision, of the dense peak, for large GEMMs. attention: flash attention forward+backward, of the
    16-bit peak. memory: of the HBM peak, for streaming element-wise kernels. intra_node_link / inter_node_link:
    of the link peaks, for NCCL collectives. overlap_slowdown: compute slows by this fraction while it overlaps
    communication kernels (they take SMs). cross_batch_overlap: fraction of the all-to-all that a cross-batch
    schedule could hide (phase against phase) which it really hides. kernel_overhead_us: fixed launch/sync cost per layer and decode step.
    memory_reserve_GB: GPU memory that the CUDA context, NCCL buffers and fragmentation take.
    """

    gemm: Mapping[str, float] = field(default_factory=lambda: {"fp32": 0.72, "fp16": 0.72, "bf16": 0.72,
                                                               "fp8": 0.55})
    attention: float = 0.45
    memory: float = 0.80
    intra_node_link: float = 0.80
    inter_node_link: float = 0.80
    overlap_slowdown: float = 0.15
    cross_batch_overlap: float = 1.0
    kernel_overhead_us: float = 10.0
    memory_reserve_GB: float = 4.0

    def __post_init__(self) -> None:
        for key, value in self.gemm.items():
            _one_of("efficiency.gemm key", key, PRECISIONS)
            _fraction(f"efficiency.gemm.{key}", value)
        for name in ("attention", "memory", "intra_node_link", "inter_node_link"):
            _fraction(f"efficiency.{name}", getattr(self, name))
        if isinstance(self.cross_batch_overlap, bool) or not 0 <= self.cross_batch_overlap <= 1:
            raise ValueError(f"efficiency.cross_batch_overlap={self.cross_batch_overlap!r} must be in [0, 1]")
        for name in ("overlap_slowdown", "kernel_overhead_us", "memory_reserve_GB"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"efficiency.{name}={value!r} must be a finite number >= 0")

    def gemm_fraction(self, precision: str) -> float:
        if precision in self.gemm:
            return float(self.gemm[precision])
        raise ValueError(f"precision={precision!r}: efficiency.gemm has no entry for it (it has {sorted(self.gemm)})")


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """nodes x gpus_per_node identical GPUs; intra_node links (NVLink) and inter_node links (one NIC per GPU)."""

    name: str
    gpu: GPUSpec
    nodes: int
    gpus_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec
    efficiency: EfficiencySpec = field(default_factory=EfficiencySpec)

    def __post_init__(self) -> None:
        _at_least("cluster.nodes", self.nodes, 1)
        _at_least("cluster.gpus_per_node", self.gpus_per_node, 1)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    # Effective rates: what the formulas divide by.
    def gemm_flops(self, precision: str) -> float:
        return self.gpu.peak_flops(precision) * self.efficiency.gemm_fraction(precision)

    def attention_flops(self, precision: str) -> float:
        # Flash attention keeps the softmax path in 16 bit even in FP8 training.
        p = "bf16" if precision == "fp8" else precision
        return self.gpu.peak_flops(p) * self.efficiency.attention

    @property
    def memory_bytes_per_s(self) -> float:
        return self.gpu.hbm_bytes_per_s * self.efficiency.memory

    def link_bytes_per_s(self, inter: bool) -> float:
        if inter:
            return self.inter_node.bytes_per_s * self.efficiency.inter_node_link
        return self.intra_node.bytes_per_s * self.efficiency.intra_node_link

    def link_latency_s(self, inter: bool) -> float:
        return (self.inter_node if inter else self.intra_node).latency_s


# ---- building from mappings and YAML ---------------------------------------------------------------------------
def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Unknown and missing keys are ValueErrors naming them; ints are accepted where floats are expected;
    bool is not an int. `where` prefixes field names in messages (e.g. "cluster.").
    """
    label = where.rstrip(".") or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{label} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {label}; valid keys are {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{label} is missing required key(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except _LocatedError:
        raise
    except ValueError as exc:
        # Say where in the file the bad value sits (e.g. "cluster.inter_node"), once.
        raise _LocatedError(f"{label}: {exc}" if where else str(exc)) from None


class _LocatedError(ValueError):
    """A ValueError whose message already names where in the file the bad value is."""


def _convert(hint: Any, value: Any, name: str) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # "X | None"
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, name + ".")
    origin = typing.get_origin(hint)
    if origin is not None and origin.__name__ == "Mapping":
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}={value!r} must be a mapping")
        return {str(k): _convert(float, v, f"{name}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} has the wrong type: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} has the wrong type: expected an integer")
        return value
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} has the wrong type: expected true or false")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{name}={value!r} has the wrong type: expected a string")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. A bare name (no '/' and no suffix) is looked up in the shipped presets."""
    p = resolve_preset_path(path)
    data = read_yaml(p)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def resolve_preset_path(path: str | Path) -> Path:
    """`path` itself if it exists; a bare name like "h100_2x8" means presets/h100_2x8.yaml."""
    p = Path(path)
    if p.exists():
        return p
    if p.parent == Path(".") and not p.suffix:
        candidate = PRESETS_DIR / f"{p.name}.yaml"
        if candidate.exists():
            return candidate
        names = sorted(q.stem for q in PRESETS_DIR.glob("*.yaml"))
        raise ValueError(f"no file {str(path)!r} and no preset of that name; presets are {names}")
    raise ValueError(f"file {str(path)!r} does not exist")


def load_model(path: str | Path) -> ModelSpec:
    """A ModelSpec from a YAML file or a preset name (see presets/*.yaml)."""
    return from_mapping(ModelSpec, load_yaml(path))


def load_cluster(path: str | Path, nodes: int | None = None) -> ClusterSpec:
    """A ClusterSpec from a YAML file or a preset name; `nodes` overrides the file's node count."""
    data = load_yaml(path)
    if nodes is not None:
        data = {**data, "nodes": nodes}
    return from_mapping(ClusterSpec, data, "cluster.")


# ---- small checks ----------------------------------------------------------------------------------------------
def _at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} has the wrong type: expected an integer")
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")


def _positive_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def _fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must be a fraction in (0, 1]")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
