"""The expert: a plain dense MLP applied to a contiguous buffer of rows.

Shape legend:
    N  rows (tokens received by this expert)    H  hidden size    F  expert ffn hidden size
    M  rows received by a rank holding several experts    R  ranks in the EP group    L  local experts (slots)

Parameter names (stable: checkpoints and the adapters rely on them):
    GELU:   fc1.weight [F, H], fc2.weight [H, F];            expert(x) = fc2(gelu(fc1(x)))   (exact GELU)
    SwiGLU: fc1.weight [2F, H] (rows 0..F-1 are the gate, rows F..2F-1 the up projection, Megatron's order),
            fc2.weight [H, F];                               expert(x) = fc2(silu(gate(x)) * up(x))
    SwiGLU-OAI (``"swiglu_oai"``, gpt-oss): the same layout; with g = min(gate(x), limit) and
            u = clamp(up(x), -limit, limit):                 expert(x) = fc2((u + 1) * g * sigmoid(alpha * g))
    With ``linear_bias`` the linears also have ``fc1.bias`` and ``fc2.bias``.
With ``expert_compute_dtype="bfloat16"`` both GEMMs (and the activation between them) run on bfloat16 casts of the
rows and weights and the result returns in the rows' dtype: torchtitan's ``GroupedExperts`` numerics.

gpt-oss in Hugging Face Transformers stores expert e as ``gate_up_proj[e]`` [H, 2F] with the gate and up columns
*interleaved* (gate = columns 0, 2, 4, ..., up = columns 1, 3, 5, ...), ``gate_up_proj_bias[e]`` [2F] likewise,
``down_proj[e]`` [F, H] and ``down_proj_bias[e]`` [H]. In our layout:
    fc1.weight = cat(gate_up_proj[e][:, 0::2].T, gate_up_proj[e][:, 1::2].T)   [2F, H], gate rows first
    fc1.bias   = cat(gate_up_proj_bias[e][0::2], gate_up_proj_bias[e][1::2])
    fc2.weight = down_proj[e].T [H, F];  fc2.bias = down_proj_bias[e]

Expert tensor parallelism (``tp_size`` t > 1): shard j of t holds rows j*F/t..(j+1)*F/t-1 of fc1 (for SwiGLU the
same rows of the gate and of the up projection, still gate first: ``fc1.weight`` [2F/t, H]), the same columns
of fc2 (``fc2.weight`` [H, F/t]) and, on shard 0 only, ``fc2.bias``: its output is a partial sum, and the t
partials of a row add up to the whole expert's output (the activation is elementwise over F). The shards are
slices of the expert's seeded weights, so they equal the dense reference's expert e sliced.

Expert parameters carry ``allreduce = False`` (the Megatron and DeepSpeed convention): they are not data-parallel
over the EP group, so a trainer's gradient all-reduce must skip them (see ``grads.py``).

``LocalExperts`` holds the several experts of a rank when experts are colocated (more experts than GPUs, opt-in):
a ``ModuleList`` of ``ExpertMLP`` indexed by local slot (parameter names ``<slot>.fc1.weight``, ...), each with the
seeded init of its global expert id, so slot l equals the dense reference's expert ``expert_ids[l]``.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ExpertConfig
from .grouped_gemm import grouped_mlp


def expert_seed(init_seed: int, expert_id: int) -> int:
    """Seed of expert ``expert_id``'s initialisation; the same on every rank and in the dense reference."""
    return (init_seed * 1_000_003 + 7919 * (expert_id + 1)) % (2**63)


def activate(h_NX: torch.Tensor, config: ExpertConfig) -> torch.Tensor:
    """The activation between fc1 and fc2: [N, F] -> [N, F] (GELU) or [N, 2F] gate-first -> [N, F] (the GLUs)."""
    if config.activation == "gelu":
        return F.gelu(h_NX)  # exact (erf) GELU
    gate, up = h_NX.chunk(2, dim=-1)
    if config.activation == "swiglu":
        return F.silu(gate) * up
    # swiglu_oai (gpt-oss): clamped, with a sigmoid slope and a shifted up projection.
    gate = gate.clamp(max=config.swiglu_limit)
    up = up.clamp(min=-config.swiglu_limit, max=config.swiglu_limit)
    return (up + 1) * gate * torch.sigmoid(config.swiglu_alpha * gate)


class LinearWeights(NamedTuple):
    """A linear's ``weight`` and ``bias`` (None: none) held apart from a module (a clone's views of its slot
    buffer); called like ``nn.Linear`` (the same ``F.linear``, so the same numbers)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MLPWeights(NamedTuple):
    """The two linears of one expert outside a module: ``fc1`` [F or 2F, H] and ``fc2`` [H, F] (what ``mlp``,
    ``run_slots`` and ``grouped_gemm.grouped_mlp`` read, as they read an ``ExpertMLP``)."""

    fc1: LinearWeights
    fc2: LinearWeights


def compute_dtype(config: ExpertConfig) -> torch.dtype | None:
    """The dtype the expert GEMMs cast their operands to (``expert_compute_dtype``), None for the parameters' own."""
    return None if config.compute_dtype is None else getattr(torch, config.compute_dtype)


def mlp(rows_NH: torch.Tensor, fc1: nn.Linear | LinearWeights, fc2: nn.Linear | LinearWeights,
        config: ExpertConfig) -> torch.Tensor:
    """fc2(activation(fc1(rows))), in ``compute_dtype(config)`` when set: the result then in the rows' dtype, and
    for the GLUs the gate and up projections as two GEMMs on two casts of the rows, as torchtitan computes them, so
    that their input gradients are rounded to bfloat16 apart and summed in the rows' dtype (as torchtitan's are)."""
    dtype = compute_dtype(config)
    if dtype is None:
        return fc2(activate(fc1(rows_NH), config))

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(rows_NH.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    if is_gated(config.activation):
        w_gate, w_up = fc1.weight.chunk(2)
        b_gate, b_up = (None, None) if fc1.bias is None else fc1.bias.chunk(2)
        h_NX = torch.cat([linear(w_gate, b_gate), linear(w_up, b_up)], dim=-1)
    else:
        h_NX = linear(fc1.weight, fc1.bias)
    out_NH = F.linear(activate(h_NX, config), fc2.weight.to(dtype), None if fc2.bias is None else fc2.bias.to(dtype))
    return out_NH.to(rows_NH.dtype)




def is_gated(activation: str) -> bool:
    """Whether fc1 holds a gate and an up projection ([2F, H])."""
    return activation in ("swiglu", "swiglu_oai")


class ExpertMLP(nn.Module):
    """One expert, or shard ``tp_rank`` of ``tp_size`` of it. ``forward(rows_NH) -> rows_NH`` (a shard: its
    partial sum of the output); an empty input gives an empty output (no special case)."""

    # Expert parameters are not reduced over the EP group (``allreduce = False``); a dense MLP of the same shape
    # (the shared expert) sets this to False.
    expert_parallel = True

    def __init__(self, config: ExpertConfig, *, expert_id: int, init_seed: int = 0, tp_rank: int = 0,
                 tp_size: int = 1):
        super().__init__()
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size={tp_size!r} must be an integer >= 1")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank!r} must be in [0, {tp_size})")
        if config.ffn_hidden_size % tp_size:
            raise ValueError(f"ffn_hidden_size={config.ffn_hidden_size} is not divisible by the expert-TP size "
                             f"{tp_size}")
        self.config = config
        self.expert_id = expert_id
        self.tp_rank, self.tp_size = tp_rank, tp_size
        h, f = config.hidden_size, config.ffn_hidden_size // tp_size
        fc1_out = 2 * f if is_gated(config.activation) else f
        self.fc1 = nn.Linear(h, fc1_out, bias=config.linear_bias)
        self.fc2 = nn.Linear(f, h, bias=config.linear_bias and tp_rank == 0)
        self.reset_parameters(init_seed)
        if self.expert_parallel:
            for p in self.parameters():
                p.allreduce = False  # expert parameter: not reduced over the EP group

    @torch.no_grad()
    def reset_parameters(self, init_seed: int) -> None:
        """The expert's seeded weights (the whole expert's, on the host, then this shard's slice); zero biases."""
        gen = torch.Generator().manual_seed(expert_seed(init_seed, self.expert_id))
        h, f = self.config.hidden_size, self.config.ffn_hidden_size
        fc1_rows = 2 * f if is_gated(self.config.activation) else f
        fc1 = torch.randn((fc1_rows, h), generator=gen) * self.config.init_std
        fc2 = torch.randn((h, f), generator=gen) * self.config.init_std
        rows = self.ffn_rows()
        self.fc1.weight.copy_(fc1[rows])
        self.fc2.weight.copy_(fc2[:, rows[: f // self.tp_size]])
        for lin in (self.fc1, self.fc2):
            if lin.bias is not None:
                lin.bias.zero_()

    def ffn_rows(self) -> torch.Tensor:
        """int64: the rows of the whole expert's ``fc1`` this shard holds (gate rows, then up rows for SwiGLU);
        the first F/t of them are also its columns of ``fc2``."""
        f = self.config.ffn_hidden_size
        part = torch.arange(self.tp_rank * f // self.tp_size, (self.tp_rank + 1) * f // self.tp_size)
        return torch.cat([part, part + f]) if is_gated(self.config.activation) else part

    def forward(self, rows_NH: torch.Tensor) -> torch.Tensor:
        return mlp(rows_NH, self.fc1, self.fc2, self.config)


class SlotExperts:
    """The experts of one rank for one forward, slot by slot: ``slots[l]`` runs slot l (an ``ExpertMLP``, a clone's
    ``MLPWeights``, or None: an empty slot, which must receive no rows). Called like ``LocalExperts``.

    ``parameters()`` are the tensors it is differentiable in, what the overlap pipeline differentiates: the
    modules' parameters, then ``tensors`` (the clones' weights, of which their ``MLPWeights`` are views).
    ``outer_of``: {id(stand-in): the tensor it stands for}, for a tensor the experts compute with as a detached
    leaf (``overlap._PipelineRun``)."""

    def __init__(self, slots: Sequence[nn.Module | MLPWeights | None], config: ExpertConfig,
                 tensors: Sequence[torch.Tensor] = (), outer_of: dict[int, torch.Tensor] | None = None):
        self.weights = list(slots)
        self.config = config
        self.tensors = list(tensors)
        self.outer_of = outer_of or {}

    def parameters(self) -> Iterator[torch.Tensor]:
        for w in self.weights:
            if isinstance(w, nn.Module):
                yield from w.parameters()
        yield from self.tensors

    def __call__(self, rows_MH: torch.Tensor, recv_counts_RL: Sequence[Sequence[int]],
                 recv_counts_dev_RL: torch.Tensor | None = None) -> torch.Tensor:
        return run_slots(rows_MH, recv_counts_RL, recv_counts_dev_RL, self.weights, self.config)


def run_slots(rows_MH: torch.Tensor, recv_counts_RL: Sequence[Sequence[int]], recv_counts_dev_RL: torch.Tensor | None,
              weights: Sequence[nn.Module | MLPWeights | None], config: ExpertConfig) -> torch.Tensor:
    """Each slot's expert on its rows, rows as the dispatch delivers them: grouped by source rank, and inside each
    source's block by slot (``recv_counts_RL[r][l]`` rows of source r for slot l; the same on the device in
    ``recv_counts_dev_RL``, or None to copy them there). Slots past ``len(weights)`` and empty slots (None) must
    receive no rows. Returns the outputs in arrival order.

    It gathers each slot's rows into one contiguous buffer (a local permutation), runs that expert on them, and
    puts the results back in arrival order: a loop over the slots, or with ``grouped_gemm`` two grouped GEMMs over
    all of them (grouped_gemm.py)."""
    num_local = len(weights)
    width = len(recv_counts_RL[0]) if len(recv_counts_RL) else num_local
    counts = [int(c) for per_source in recv_counts_RL for c in per_source]
    per_slot = [sum(int(c[l]) for c in recv_counts_RL) for l in range(min(width, num_local))]
    empty_used = any(w is None and n for w, n in zip(weights, per_slot))
    if (width < num_local or empty_used or any(len(per_source) != width or any(per_source[num_local:])
                                               for per_source in recv_counts_RL) or sum(counts) != rows_MH.shape[0]):
        raise ValueError(
            f"recv_counts_RL={[list(c) for c in recv_counts_RL]} must give at least {num_local} counts per "
            f"source rank (0 past them and for empty slots), summing to the {rows_MH.shape[0]} rows received"
        )
    dev = rows_MH.device
    if recv_counts_dev_RL is None:
        recv_counts_dev_RL = torch.tensor(counts, dtype=torch.long).to(dev)
    # The slot of every received row; output_size from the host counts, so the device never reports a size.
    slot_M = torch.repeat_interleave(torch.arange(width, device=dev).repeat(len(recv_counts_RL)),
                                     recv_counts_dev_RL.reshape(-1), output_size=rows_MH.shape[0])
    # Stable: inside one slot, rows stay in (source rank, token) order, as a lone expert would see them.
    order_M = torch.sort(slot_M, stable=True).indices
    sorted_MH = rows_MH.index_select(0, order_M)
    if config.grouped_gemm:
        present = next(w for w in weights if w is not None)  # an empty slot's group is empty: any weights do
        per_slot_dev = recv_counts_dev_RL.reshape(len(recv_counts_RL), width).sum(dim=0)[:num_local]
        out_MH = grouped_mlp([w if w is not None else present for w in weights], sorted_MH, per_slot, config,
                             per_slot_dev)
    else:
        parts = sorted_MH.split(per_slot)
        out_MH = torch.cat([part if w is None else w(part) if isinstance(w, nn.Module) else
                            mlp(part, w.fc1, w.fc2, config) for w, part in zip(weights, parts)])
    # Back to arrival order, so the combine all-to-all returns each row to its source unchanged.
    return _unsort(out_MH, order_M)


class LocalExperts(nn.ModuleList):
    """The experts of one rank that holds several (colocated experts); slot l holds expert ``expert_ids[l]``.

    ``forward(rows_MH, recv_counts_RL)`` takes the rows as the flat dispatcher delivers them: grouped by source
    rank, and inside each source's block by local slot (``recv_counts_RL[r][l]`` rows of source r for slot l).
    L may exceed the number of local experts (it is the most experts any rank of the layer holds): the counts
    of the slots past them must be 0.
    It gathers each slot's rows into one contiguous buffer (a local permutation), runs that expert on them, and
    puts the results back in arrival order. A loop over the slots, or with ``grouped_gemm`` two grouped GEMMs
    over all of them (grouped_gemm.py).
    """

    def __init__(self, config: ExpertConfig, *, expert_ids: Sequence[int], init_seed: int = 0):
        ids = tuple(int(e) for e in expert_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"expert_ids={tuple(expert_ids)!r} must be a non-empty list of distinct expert ids")
        super().__init__(ExpertMLP(config, expert_id=e, init_seed=init_seed) for e in ids)
        self.expert_ids = ids

    def forward(self, rows_MH: torch.Tensor, recv_counts_RL: Sequence[Sequence[int]],  # type: ignore[override]
                recv_counts_dev_RL: torch.Tensor | None = None) -> torch.Tensor:
        """``recv_counts_RL``: host [R][L] rows per (source, slot), for the split sizes; ``recv_counts_dev_RL``: the
        same counts on the rows' device (the dispatch's count exchange has them there), so that grouping the rows
        by slot needs no host-to-device copy. None: built from the host counts (a copy). See ``run_slots``."""
        return run_slots(rows_MH, recv_counts_RL, recv_counts_dev_RL, list(self), self[0].config)


def _unsort(sorted_MH: torch.Tensor, order_M: torch.Tensor) -> torch.Tensor:
    """The inverse of ``index_select(0, order_M)``: row i of the result is row ``inverse[i]`` of ``sorted_MH``."""
    inverse_M = torch.empty_like(order_M)
    inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    return sorted_MH.index_select(0, inverse_M)
