"""Configuration of a large expert-parallel MoE layer.

``LargeEPConfig`` is what users write: flat keyword arguments (or a dict through ``from_dict``). Each component
reads its own small frozen view of it (``router_config``, ``expert_config``, ``dispatch_config``), so no component
sees settings it does not use.

Validation is strict and happens once, at construction: an unknown key, a wrong type or an impossible value is a
``ValueError`` that names the field and the value.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from largeep_plugin.placement.topology import as_int

ACTIVATIONS = ("gelu", "swiglu", "swiglu_oai")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DISPATCH_KINDS = ("flat", "hierarchical")
ROUTER_DTYPES = ("float32", "float64")
EXPERT_COMPUTE_DTYPES = ("bfloat16",)


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """What the router needs: scoring, top-k selection, capacity and the balancing losses."""

    num_experts: int
    top_k: int
    score_function: str
    normalize_topk: bool
    capacity_factor: float | None
    aux_loss_coeff: float
    z_loss_coeff: float
    num_groups: int | None
    group_topk: int | None
    group_score_topk: int
    routed_scaling_factor: float
    router_bias: bool
    router_dtype: str
    seq_aux_loss_coeff: float
    global_aux_loss_coeff: float


@dataclass(frozen=True, kw_only=True)
class ExpertConfig:
    """What one expert MLP needs."""

    hidden_size: int
    ffn_hidden_size: int
    activation: str
    linear_bias: bool
    init_std: float
    swiglu_limit: float
    swiglu_alpha: float
    grouped_gemm: bool
    compute_dtype: str | None = None


@dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    """How tokens travel: flat or node-batched all-to-all, and how many chunks the overlap pipeline uses."""

    dispatch: str
    overlap_chunks: int


@dataclass(frozen=True, kw_only=True)
class LargeEPConfig:
    """All settings of one large-EP MoE layer.

    Args:
        hidden_size: H, the token dimension.
        ffn_hidden_size: F, the hidden size of each expert MLP.
        num_experts: E, the number of distinct experts.
        top_k: K, experts chosen per token (1 <= K <= E).
        activation: ``"gelu"`` (exact GELU, fc1 [F, H]), ``"swiglu"`` (fc1 [2F, H], gate rows first) or
            ``"swiglu_oai"`` (gpt-oss: fc1 as SwiGLU, gate clamped above at ``swiglu_limit``, up clamped to
            +-``swiglu_limit``, out = (up + 1) * gate * sigmoid(``swiglu_alpha`` * gate); see experts.py).
        swiglu_limit: the clamp of ``"swiglu_oai"`` (> 0; gpt-oss: 7.0).
        swiglu_alpha: the sigmoid slope of ``"swiglu_oai"`` (> 0; gpt-oss: 1.702).
        score_function: ``"softmax"`` or ``"sigmoid"`` over the router logits.
        normalize_topk: divide the K combine weights of a token by their sum.
        num_groups: group-limited routing (DeepSeek-V2/V3): the E experts form ``num_groups`` contiguous groups of
            E / num_groups (expert e in group e // (E / num_groups)); each token keeps its ``group_topk`` best
            groups and picks its top-k experts inside them. None: plain top-k over all experts.
        group_topk: groups a token keeps (required with ``num_groups``, 1 <= group_topk <= num_groups, and
            top_k <= group_topk * E / num_groups).
        group_score_topk: a group's score is the sum of its ``group_score_topk`` highest selection scores
            (score + bias): DeepSeek-V3 and Hugging Face 2, DeepSeek-V2 1 (the max), Megatron top_k // group_topk.
        routed_scaling_factor: multiplies the combine weights after any normalisation (DeepSeek-V3: 2.5); > 0.
        router_bias: a learned bias in the router linear, ``router.bias`` [E] (gpt-oss). Unlike the selection bias
            ``router.expert_bias`` it is part of the logits, so it changes the scores and the weights.
        router_dtype: ``"float32"`` or ``"float64"``: the dtype of the router's logits, scores and selection,
            whatever the model dtype or autocast (combine weights are float32 either way).
        capacity_factor: None for dropless; otherwise each expert takes at most
            ceil(capacity_factor * T * K / E) of a rank's T tokens, keeping the highest-scored assignments.
        bias_update_rate: step of the aux-loss-free balancing bias: bias += rate * sign(mean - count).
        aux_loss_coeff: coefficient of the switch-style load-balancing loss over the EP group's tokens of this
            forward (0 = off).
        seq_aux_loss_coeff: coefficient of the sequence-wise balancing loss (DeepSeek-V3; Megatron
            ``seq_aux_loss``): the switch loss of each sequence on its own, averaged over the sequences. A sequence
            is ``x[b]`` of a ``[B, S, H]`` input (``[..., S, H]``: every leading index is a sequence; ``[T, H]``:
            one sequence). See ``load_balance.sequence_aux_loss``.
        global_aux_loss_coeff: coefficient of the global-batch balancing loss (Qwen3; Megatron
            ``global_aux_loss``): the switch loss whose assignment fractions count the global batch, i.e. every
            token of the EP group, of every data-parallel copy of it (``LargeEPMoE(dp_group=...)``), and of every
            micro-batch since the last ``reset_global_load()`` (``update_expert_bias`` resets it too).
        z_loss_coeff: coefficient of the router z-loss (0 = off).
        overlap_chunks: number of token chunks the overlap pipeline cuts a batch into (1 = no overlap).
        dispatch: ``"flat"`` all-to-all, or ``"hierarchical"`` (node-batched).
        linear_bias: add biases to the expert linears (off by default, as in Megatron's MoE).
        grouped_gemm: run a rank's colocated experts as two grouped GEMMs (``torch._grouped_mm``) instead of a loop
            over them: CPU float32/bfloat16, or bfloat16 on GPUs of compute capability >= 9.0; hidden and ffn rows
            must be multiples of 16 bytes (grouped_gemm.py).
        expert_compute_dtype: None (the experts compute in their parameters' dtype), or ``"bfloat16"``: the routed
            experts' GEMMs take bfloat16 operands (rows and weights cast) and their output returns in the rows' dtype,
            whatever the parameters' dtype, as torchtitan's ``GroupedExperts`` computes (so a torchtitan model gives
            the same numbers with this layer). The shared expert keeps its parameters' dtype.
        shared_ffn_hidden_size: the hidden size of the shared expert, an MLP (same activation and layout as the
            routed experts) that every token goes through on its own rank (DeepSeek, Qwen2-MoE). Several shared
            experts are one MLP of their summed size. None: no shared expert.
        shared_expert_gate: multiply the shared expert's output by sigmoid(x @ w), ``shared_expert_gate.weight``
            [1, H] (Qwen2-MoE). Needs ``shared_ffn_hidden_size``.
        init_std: standard deviation of the normal initialisation of router and expert weights.
        init_seed: seed of that initialisation; expert e always starts from the same weights, on any rank and in
            the dense reference, so sharded and dense models can be compared without copying weights.
        check_inputs: check every forward, collectively over the EP group, that inputs are finite, shaped right
            and of one dtype the experts take (their parameters' or autocast's), so that a bad input on one rank
            is an error on all ranks instead of a hang or a crash.
        dynamic_replicas: S spare expert slots per rank for clones of hot experts, re-planned from the load while
            training (0 = off; docs/balancing.md). Clones are buffers, refreshed from their home experts by
            ``largeep_plugin.rebalance(model)`` after every optimizer step; their gradients return to the homes
            inside the layer's backward. Not with expert tensor parallelism.
        rebalance_every: re-plan the clones every N calls of ``rebalance`` (>= 1; every call refreshes them).
        rebalance_decay: the load the planner sees is an exponential moving average over steps,
            ema = decay * ema + (1 - decay) * this step's load (0 <= decay < 1; 0: the last step only).
        rebalance_margin: hysteresis: a new plan replaces the current one only when it lowers the busiest rank's
            rows by more than this fraction of the mean (or, within it, the busiest inter-node link by this
            fraction); otherwise only the shares follow the load (>= 0).
        replace_every: live re-placement (0 = off; docs/moves.md): every N calls of ``rebalance(model, optimizer)``
            the layer plans a layout of its home experts from the co-activation of the last N steps and moves the
            experts, with their gradients and optimizer state, when the busiest inter-node link gets lighter by
            more than ``replace_margin`` and the time saved over the next N steps pays for the bytes. Not with
            static replicas (an expert on several ranks), expert tensor parallelism or group-limited routing.
        replace_margin: the fraction of today's busiest-link time a new layout must save (>= 0).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    activation: str = "gelu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    score_function: str = "softmax"
    normalize_topk: bool = True
    num_groups: int | None = None
    group_topk: int | None = None
    group_score_topk: int = 2
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    router_dtype: str = "float32"
    capacity_factor: float | None = None
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 0.0
    global_aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    overlap_chunks: int = 1
    dispatch: str = "flat"
    linear_bias: bool = False
    grouped_gemm: bool = False
    expert_compute_dtype: str | None = None
    shared_ffn_hidden_size: int | None = None
    shared_expert_gate: bool = False
    init_std: float = 0.02
    init_seed: int = 1234
    check_inputs: bool = True
    dynamic_replicas: int = 0
    rebalance_every: int = 1
    rebalance_decay: float = 0.5
    rebalance_margin: float = 0.02
    replace_every: int = 0
    replace_margin: float = 0.05

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), _FIELD_TYPES[f.name]))
        _positive("hidden_size", self.hidden_size)
        _positive("ffn_hidden_size", self.ffn_hidden_size)
        _positive("num_experts", self.num_experts)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} is impossible: it must be between 1 and num_experts={self.num_experts}"
            )
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("score_function", self.score_function, SCORE_FUNCTIONS)
        _one_of("dispatch", self.dispatch, DISPATCH_KINDS)
        if self.capacity_factor is not None and not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor={self.capacity_factor!r} must be a positive number, or None for dropless")
        for name in ("bias_update_rate", "aux_loss_coeff", "seq_aux_loss_coeff", "global_aux_loss_coeff",
                     "z_loss_coeff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        for name in ("init_std", "routed_scaling_factor", "swiglu_limit", "swiglu_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")
        _one_of("router_dtype", self.router_dtype, ROUTER_DTYPES)
        if self.expert_compute_dtype is not None:
            _one_of("expert_compute_dtype", self.expert_compute_dtype, EXPERT_COMPUTE_DTYPES)
        _positive("overlap_chunks", self.overlap_chunks)
        self._check_groups()
        if self.dynamic_replicas < 0:
            raise ValueError(f"dynamic_replicas={self.dynamic_replicas!r} must be >= 0 (spare expert slots per rank; "
                             "0 = off)")
        _positive("rebalance_every", self.rebalance_every)
        if not (math.isfinite(self.rebalance_decay) and 0 <= self.rebalance_decay < 1):
            raise ValueError(f"rebalance_decay={self.rebalance_decay!r} must be a number in [0, 1)")
        if not (math.isfinite(self.rebalance_margin) and self.rebalance_margin >= 0):
            raise ValueError(f"rebalance_margin={self.rebalance_margin!r} must be a finite number >= 0")
        if self.replace_every < 0:
            raise ValueError(f"replace_every={self.replace_every!r} must be >= 0 (steps between decisions to move "
                             "home experts; 0 = off)")
        if not (math.isfinite(self.replace_margin) and self.replace_margin >= 0):
            raise ValueError(f"replace_margin={self.replace_margin!r} must be a finite number >= 0")
        if self.replace_every and self.num_groups is not None:
            raise NotImplementedError(f"replace_every={self.replace_every} with num_groups={self.num_groups}: moves "
                                      "do not keep each routing group on one node yet; set replace_every=0")
        if self.shared_ffn_hidden_size is not None:
            _positive("shared_ffn_hidden_size", self.shared_ffn_hidden_size)
        elif self.shared_expert_gate:
            raise ValueError("shared_expert_gate=True needs a shared expert: set shared_ffn_hidden_size")

    def _check_groups(self) -> None:
        """Group-limited routing: the groups must split the experts evenly and leave room for top_k experts."""
        if self.num_groups is None:
            if self.group_topk is not None:
                raise ValueError(f"group_topk={self.group_topk!r} needs num_groups (group-limited routing); "
                                 "got num_groups=None")
            return
        e, g = self.num_experts, self.num_groups
        _positive("num_groups", g)
        if e % g:
            raise ValueError(f"num_groups={g} does not divide num_experts={e}: the groups must be equal")
        if self.group_topk is None:
            raise ValueError(f"num_groups={g} needs group_topk (the groups each token keeps), got None")
        if not 1 <= self.group_topk <= g:
            raise ValueError(f"group_topk={self.group_topk} must be between 1 and num_groups={g}")
        size = e // g
        if self.top_k > self.group_topk * size:
            raise ValueError(f"top_k={self.top_k} is impossible with group_topk={self.group_topk} groups of "
                             f"{size} experts: at most {self.group_topk * size} experts are reachable")
        if not 1 <= self.group_score_topk <= size:
            raise ValueError(f"group_score_topk={self.group_score_topk} must be between 1 and the group size "
                             f"{size} (num_experts={e} / num_groups={g})")

    # ---- component views -------------------------------------------------------------------------------------
    @property
    def router_config(self) -> RouterConfig:
        return RouterConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            score_function=self.score_function,
            normalize_topk=self.normalize_topk,
            capacity_factor=self.capacity_factor,
            aux_loss_coeff=self.aux_loss_coeff,
            z_loss_coeff=self.z_loss_coeff,
            num_groups=self.num_groups,
            group_topk=self.group_topk,
            group_score_topk=self.group_score_topk,
            routed_scaling_factor=float(self.routed_scaling_factor),
            router_bias=self.router_bias,
            router_dtype=self.router_dtype,
            seq_aux_loss_coeff=float(self.seq_aux_loss_coeff),
            global_aux_loss_coeff=float(self.global_aux_loss_coeff),
        )

    @property
    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            activation=self.activation,
            linear_bias=self.linear_bias,
            init_std=self.init_std,
            swiglu_limit=float(self.swiglu_limit),
            swiglu_alpha=float(self.swiglu_alpha),
            grouped_gemm=self.grouped_gemm,
            compute_dtype=self.expert_compute_dtype,
        )

    @property
    def shared_expert_config(self) -> ExpertConfig | None:
        """The shared expert's MLP: the routed experts' settings with ``shared_ffn_hidden_size``; None without."""
        if self.shared_ffn_hidden_size is None:
            return None
        return dataclasses.replace(self.expert_config, ffn_hidden_size=self.shared_ffn_hidden_size, compute_dtype=None)

    @property
    def dispatch_config(self) -> DispatchConfig:
        return DispatchConfig(dispatch=self.dispatch, overlap_chunks=self.overlap_chunks)

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LargeEPConfig":
        """Build from a mapping; unknown keys and missing required keys are errors that name them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"LargeEPConfig.from_dict expects a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(f"unknown LargeEPConfig key(s) {unknown}; valid keys are {valid}")
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in d
        ]
        if missing:
            raise ValueError(f"LargeEPConfig is missing required key(s) {missing}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "LargeEPConfig":
        return dataclasses.replace(self, **changes)


# Types accepted per field. bool is not an int here (True is not a valid hidden_size), and an int is accepted
# where a float is expected (capacity_factor=1 means 1.0). Any integer type counts as int and any real as float
# (numpy's scalars too, stored as Python numbers: see _checked).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "hidden_size": (int,),
    "ffn_hidden_size": (int,),
    "num_experts": (int,),
    "top_k": (int,),
    "activation": (str,),
    "swiglu_limit": (float, int),
    "swiglu_alpha": (float, int),
    "score_function": (str,),
    "normalize_topk": (bool,),
    "num_groups": (int, type(None)),
    "group_topk": (int, type(None)),
    "group_score_topk": (int,),
    "routed_scaling_factor": (float, int),
    "router_bias": (bool,),
    "router_dtype": (str,),
    "capacity_factor": (float, int, type(None)),
    "bias_update_rate": (float, int),
    "aux_loss_coeff": (float, int),
    "seq_aux_loss_coeff": (float, int),
    "global_aux_loss_coeff": (float, int),
    "z_loss_coeff": (float, int),
    "overlap_chunks": (int,),
    "dispatch": (str,),
    "linear_bias": (bool,),
    "grouped_gemm": (bool,),
    "expert_compute_dtype": (str, type(None)),
    "shared_ffn_hidden_size": (int, type(None)),
    "shared_expert_gate": (bool,),
    "init_std": (float, int),
    "init_seed": (int,),
    "check_inputs": (bool,),
    "dynamic_replicas": (int,),
    "rebalance_every": (int,),
    "rebalance_decay": (float, int),
    "rebalance_margin": (float, int),
    "replace_every": (int,),
    "replace_margin": (float, int),
}


def _checked(name: str, value: Any, types: tuple[type, ...]) -> Any:
    """``value`` if it has one of ``types``; an integer of another type (numpy.int64(16)) as a Python int, a real
    (numpy.float32) as a Python float, where the field takes those; ValueError naming the field otherwise."""
    if isinstance(value, bool) and bool not in types:
        raise ValueError(f"{name}={value!r} has the wrong type: expected {_type_names(types)}, got bool")
    if isinstance(value, (bool, str, type(None))) and isinstance(value, types):
        return value
    if int in types and as_int(value) is not None:
        return as_int(value)
    if float in types and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name}={value!r} has the wrong type: expected {_type_names(types)}, got {type(value).__name__}")


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value!r} must be >= 1")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
