"""The expert(s) of one EP rank inside Megatron's ``MoELayer``: the core ``ExpertMLP`` (one expert) or
``LocalExperts`` (colocated experts), called the way Megatron calls its experts, and their distributed-checkpoint
layout (every expert under its global id: ``checkpoint.py``).

Shape legend:
    M  rows this rank's expert(s) receive      H  hidden size      R  ranks in the EP group      L  slots per rank
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from megatron.core.utils import get_pg_rank

from largeep_plugin.layer.clones import CloneSlots
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.experts import ExpertMLP, LocalExperts
from .checkpoint import BUCKET_FORMATS, LAYOUT_KEY, check_layout, expert_sharded_state_dict, layout_sharded_object


class LargeEPExperts(nn.Module):
    """The expert(s) of this rank, called the way ``MoELayer`` calls its experts.

    ``forward(rows_MH, tokens_per_expert, permuted_probs) -> (rows_MH * permuted_probs, None)``. One expert per rank: the core
    ``ExpertMLP`` as ``expert`` (``expert.fc1.weight`` ...). A colocated placement (several experts on some rank):
    the core ``LocalExperts`` as ``local_experts`` (``local_experts.<slot>.fc1.weight`` ..., slot l holding
    ``expert_ids[l]``), on every rank of the layer; ``tokens_per_expert`` is then the dispatcher's [R, L] rows per
    (source rank, slot). Parameters are tagged ``allreduce=False``; ``sharded_state_dict`` stores every expert
    under its global expert id (``integrations/megatron/checkpoint.py``).

    Args:
        config: the layer's ``LargeEPConfig``.
        expert_ids: the experts this rank holds, ascending.
        ep_replicas: for each of them, its replica index inside the EP group (0: its first holder).
        expt_dp_group: Megatron's expert-data-parallel group.
        colocated: whether some rank of the layer holds several experts (then ``local_experts`` on every rank).
        tp_rank, tp_size: expert tensor parallelism: this rank holds shard ``tp_rank`` of ``tp_size`` of its expert.
    """

    def __init__(
        self,
        config: LargeEPConfig,
        *,
        expert_ids: Sequence[int],
        ep_replicas: Sequence[int],
        expt_dp_group: Any,
        colocated: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        self.expert_ids = tuple(int(e) for e in expert_ids)
        if tp_size != 1 and colocated:
            raise NotImplementedError(f"tp_size={tp_size} with colocated experts: expert shards are one per rank")
        if len(ep_replicas) != len(self.expert_ids) or (len(self.expert_ids) > 1 and not colocated):
            raise ValueError(f"expert_ids={self.expert_ids} with ep_replicas={tuple(ep_replicas)} and "
                             f"colocated={colocated}: one replica index per expert; several experts need colocated")
        self.colocated = colocated
        if colocated:
            self.local_experts = LocalExperts(config.expert_config, expert_ids=self.expert_ids, init_seed=config.init_seed)
        else:
            self.expert = ExpertMLP(config.expert_config, expert_id=self.expert_ids[0], init_seed=config.init_seed,
                                    tp_rank=tp_rank, tp_size=tp_size)
        self.tp_size = tp_size
        self.num_experts = config.num_experts
        self.ep_replicas = tuple(int(r) for r in ep_replicas)
        self.expt_dp_group = expt_dp_group
        # Set by LargeEPMoELayer to its dispatcher: colocated experts read the device copy of the slot counts there.
        self.count_source: Any = None
        # Set by LargeEPMoELayer with dynamic replicas: its CloneSlots (a submodule of the layer, not of this one).
        self.clones: CloneSlots | None = None
        # Set by LargeEPMoELayer: the experts of every EP rank and this rank's place (the checkpoint's layout record).
        self.home: tuple[tuple[int, ...], ...] | None = None
        self.ep_rank = 0
        self.large_ep_config = config

    @property
    def expert_id(self) -> int:
        """The expert of this rank, when it holds exactly one."""
        if len(self.expert_ids) != 1:
            raise NotImplementedError(f"this rank holds experts {self.expert_ids}: use expert_ids")
        return self.expert_ids[0]

    def experts_by_id(self) -> list[tuple[int, nn.Module]]:
        """(expert id, ``ExpertMLP``) of every expert of this rank, in ``expert_ids`` order."""
        modules = list(self.local_experts) if self.colocated else [self.expert]
        return list(zip(self.expert_ids, modules))

    def relabel(self, home: tuple[tuple[int, ...], ...]) -> None:
        """The slots now hold the experts ``home[self.ep_rank]`` (a move; the numbers were moved first)."""
        self.home = home
        self.expert_ids = home[self.ep_rank]
        for expert_id, (_, module) in zip(self.expert_ids, self.experts_by_id()):
            module.expert_id = expert_id
        if self.colocated:
            self.local_experts.expert_ids = self.expert_ids

    def forward(
        self, rows_MH: torch.Tensor, tokens_per_expert: torch.Tensor | None = None,
        permuted_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``expert(rows_MH) * permuted_probs`` (the product in float32, returned in the rows' dtype): the
        dispatcher sends each row's combine weight with it and sums the returned rows. ``permuted_probs=None``:
        the unweighted expert output."""
        if self.clones is not None:
            return self._forward_with_clones(rows_MH, tokens_per_expert, permuted_probs)
        if self.colocated:
            if tokens_per_expert is None or tokens_per_expert.dim() != 2:
                raise ValueError("colocated experts need tokens_per_expert as the dispatcher's [R, L] counts, got "
                                 f"{None if tokens_per_expert is None else tuple(tokens_per_expert.shape)}")
            counts_dev = self.count_source.recv_slot_counts_dev() if self.count_source is not None else None
            out_MH = self.local_experts(rows_MH, tokens_per_expert.tolist(), counts_dev)  # host counts: no sync
        else:
            out_MH = self.expert(rows_MH)
        if permuted_probs is None:
            return out_MH, None
        if permuted_probs.shape != out_MH.shape[:1]:
            raise ValueError(f"permuted_probs of shape {tuple(permuted_probs.shape)} for {out_MH.shape[0]} rows: "
                             "one combine weight per received row")
        return (out_MH.float() * permuted_probs.float().unsqueeze(-1)).to(out_MH.dtype), None

    def _forward_with_clones(self, rows_MH: torch.Tensor, tokens_per_expert: torch.Tensor | None,
                             permuted_probs: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """The home experts and the clones, slot by slot (``tokens_per_expert``: the dispatcher's [R, L + S]
        counts). The rows and their weights are the anchors of the clones' gradient return (``CloneSlots.bind``):
        it runs after this backward, before the dispatch's."""
        if tokens_per_expert is None or tokens_per_expert.dim() != 2:
            raise ValueError("dynamic replicas need tokens_per_expert as the dispatcher's [R, L + S] counts")
        anchors = (rows_MH,) if permuted_probs is None else (rows_MH, permuted_probs)
        homes = [m for _, m in self.experts_by_id()]
        self.clones.prepare(homes)
        anchors, slots = self.clones.bind(anchors, homes, self.large_ep_config.expert_config)
        counts_dev = self.count_source.recv_slot_counts_dev() if self.count_source is not None else None
        out_MH = slots(anchors[0], tokens_per_expert.tolist(), counts_dev)  # host counts: no sync
        if permuted_probs is None:
            return out_MH, None
        return (out_MH.float() * anchors[1].float().unsqueeze(-1)).to(out_MH.dtype), None

    def backward_dw(self) -> None:
        """Nothing to do: weight gradients are computed in the ordinary backward."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        if self.tp_size != 1:
            # The layout stores whole experts; a shard would be a slice of fc1's rows (two slices under SwiGLU)
            # and of fc2's columns, which expert_sharded_state_dict does not describe yet.
            raise NotImplementedError(f"expert_tensor_parallel_size={self.tp_size}: the distributed checkpoint of "
                                      "expert shards is not implemented (save with expert_tensor_parallel_size=1)")
        dp_rank = get_pg_rank(self.expt_dp_group)
        out: dict[str, Any] = {}
        for slot, ((expert_id, module), ep_replica) in enumerate(zip(self.experts_by_id(), self.ep_replicas)):
            out.update(expert_sharded_state_dict(
                module.state_dict(prefix="", keep_vars=True),
                f"{prefix}local_experts.{slot}." if self.colocated else f"{prefix}expert.",
                sharded_offsets,
                expert_id=expert_id,
                num_experts=self.num_experts,
                replica_id=(0, ep_replica, dp_rank),
                checkpoint_prefix=f"{prefix}expert.",
            ))
        sharding_type = (metadata or {}).get("distrib_optim_sharding_type")
        if sharding_type in BUCKET_FORMATS and self.home is not None:
            # Saved and loaded alike: Megatron-LM gives a load the metadata the checkpoint was saved with.
            out[f"{prefix}{LAYOUT_KEY}"] = layout_sharded_object(
                prefix, sharded_offsets, sharding_type=sharding_type, home=self.home,
                replica_id=(0, self.ep_rank, dp_rank))
        return out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The layout record of a checkpoint whose optimizer state is stored by buffer (checkpoint.py) is checked,
        # not loaded: it is no tensor of this module.
        saved = state_dict.pop(f"{prefix}{LAYOUT_KEY}", None)
        if saved is not None and self.home is not None:
            check_layout(saved, self.home, where=f"{prefix}{LAYOUT_KEY}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
