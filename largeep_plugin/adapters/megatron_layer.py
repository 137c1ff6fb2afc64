"""The large-EP MoE layer inside Megatron-Core: a ``MoELayer`` subclass with the plugin's router, dispatcher and
expert, injected through ``ModuleSpec`` (see ``megatron_specs.py``).

Shape legend:
    S  sequence length (local: / TP under sequence parallelism)      B  micro-batch size      H  hidden size
    E  experts      M  rows this rank's expert receives

Megatron's own stage methods (``route``, ``preprocess``, ``dispatch``, ``routed_experts_compute``, ``combine``,
``postprocess``) and its ``forward`` are inherited unchanged: they call ``self.router`` (``LargeEPRouter``),
``self.token_dispatcher`` (``LargeEPTokenDispatcher``) and ``self.experts`` (``LargeEPExperts``), so Megatron's
EP overlap can drive the layer stage by stage. Only ``__init__`` is the plugin's.

Process groups come from ``pg_collection`` (Megatron's ``TransformerLayer`` passes it only to the exact stock
classes, so the default collection of ``parallel_state`` is used unless a spec passes one in ``params``):
EP = ``ep`` (Megatron's expert-model-parallel group), expert-TP = ``expt_tp`` (must be size 1: a whole expert per
rank), expert-DP = ``expt_dp`` (Megatron's DDP reduces the expert gradients over it: they carry
``allreduce=False``).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoECudaGraphTensorStore, get_default_pg_collection
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import get_pg_rank, get_pg_size

from ..config import LargeEPConfig
from ..experts import ExpertMLP
from ..load_balance import LoadStats
from .megatron_checkpoint import expert_sharded_state_dict, replica_index
from .megatron_config import large_ep_config_from_megatron
from .megatron_dispatcher import LargeEPTokenDispatcher
from .megatron_router import LargeEPRouter


class LargeEPExperts(nn.Module):
    """The one expert of this rank, called the way ``MoELayer`` calls its experts.

    ``forward(rows_MH, tokens_per_expert, permuted_probs) -> (rows_MH, None)``; the parameters are the core
    ``ExpertMLP``'s (``expert.fc1.weight`` ...), tagged ``allreduce=False``. ``sharded_state_dict`` stores them
    under the global expert id (``megatron_checkpoint.py``).
    """

    def __init__(self, config: LargeEPConfig, *, expert_id: int, ep_replica: int, expt_dp_group: Any):
        super().__init__()
        self.expert = ExpertMLP(config.expert_config, expert_id=expert_id, init_seed=config.init_seed)
        self.expert_id = expert_id
        self.num_experts = config.num_experts
        self.ep_replica = ep_replica
        self.expt_dp_group = expt_dp_group

    def forward(
        self, rows_MH: torch.Tensor, tokens_per_expert: torch.Tensor | None = None, permuted_probs: Any = None
    ) -> tuple[torch.Tensor, None]:
        return self.expert(rows_MH), None

    def backward_dw(self) -> None:
        """Nothing to do: weight gradients are computed in the ordinary backward."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        return expert_sharded_state_dict(
            self.expert.state_dict(prefix="", keep_vars=True),
            f"{prefix}expert.",
            sharded_offsets,
            expert_id=self.expert_id,
            num_experts=self.num_experts,
            replica_id=(0, self.ep_replica, get_pg_rank(self.expt_dp_group)),
        )


def _local_expert(num_experts: int, ep_size: int, ep_rank: int, placement: Any) -> tuple[int, int, bool]:
    """(expert id of this rank, its replica index inside the EP group, whether any expert is replicated)."""
    if placement is None:
        if ep_size != num_experts:
            raise ValueError(
                f"num_moe_experts={num_experts} but the expert-model-parallel size is {ep_size}: the large-EP layer "
                "holds one expert per EP rank, so they must be equal (or pass a placement from "
                "largeep_plugin.placement to replicate experts when EP > experts)"
            )
        return ep_rank, 0, False
    rank_to_expert = list(placement.rank_to_expert)
    if len(rank_to_expert) != ep_size:
        raise ValueError(
            f"placement.rank_to_expert has {len(rank_to_expert)} entries but the EP group has {ep_size} ranks"
        )
    missing = sorted(set(range(num_experts)) - set(rank_to_expert))
    if missing or any(not 0 <= e < num_experts for e in rank_to_expert):
        raise ValueError(
            f"placement.rank_to_expert={rank_to_expert} must hold every expert 0..{num_experts - 1} (missing {missing})"
        )
    return rank_to_expert[ep_rank], replica_index(rank_to_expert, ep_rank), len(set(rank_to_expert)) < ep_size


class LargeEPMoELayer(MoELayer):
    """Megatron ``MoELayer`` whose routing, token movement and expert are the plugin's.

    Args:
        config: Megatron's ``TransformerConfig`` (translated once by ``large_ep_config_from_megatron``).
        submodules: ``MoESubmodules`` with ``router`` a ``LargeEPRouter`` and ``experts`` a ``LargeEPExperts``
            (class or ``ModuleSpec``); ``shared_experts`` is built as Megatron builds it. None: the plugin's.
        layer_number: Megatron's 1-based global layer number.
        pg_collection: Megatron's process groups (None: the default collection).
        large_ep: ``LargeEPConfig`` overrides (plugin-only fields; see ``megatron_config.py``).
        placement: which expert each EP rank holds (``largeep_plugin.placement``); None: expert e on EP rank e.

    Attributes (besides ``MoELayer``'s): ``large_ep_config``, ``expert_id``, ``ep_rank``, ``ep_size``,
    ``last_stats`` (the router's ``LoadStats`` of the latest forward).
    """

    def __init__(
        self,
        config: Any,
        submodules: MoESubmodules | None = None,
        layer_number: int | None = None,
        pg_collection: Any = None,
        *,
        large_ep: Mapping[str, Any] | None = None,
        placement: Any = None,
    ):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        if submodules is None:
            submodules = MoESubmodules(experts=LargeEPExperts, router=LargeEPRouter)
        _check_submodules(submodules)
        lep = large_ep_config_from_megatron(config, large_ep)
        if lep.overlap_chunks != 1 or lep.dispatch != "flat":
            raise NotImplementedError(
                f"overlap_chunks={lep.overlap_chunks}, dispatch={lep.dispatch!r}: inside Megatron the layer uses the "
                "flat all-to-all and Megatron's own EP overlap drives its stages; use overlap_chunks=1, dispatch='flat'"
            )
        ep_size, ep_rank = get_pg_size(pg_collection.ep), get_pg_rank(pg_collection.ep)
        expert_id, ep_replica, replicated = _local_expert(lep.num_experts, ep_size, ep_rank, placement)
        expt_tp = get_pg_size(pg_collection.expt_tp)
        if expt_tp != 1:
            raise NotImplementedError(f"the expert tensor-parallel group has {expt_tp} ranks: the large-EP layer needs 1")

        # BaseMoELayer.__init__ asserts num_experts % EP == 0 and gives each rank a contiguous block of experts;
        # under a placement an EP rank holds whichever expert the placement says (EP > E with replicas), so the
        # attributes BaseMoELayer and MoELayer set are set here, for one local expert.
        MegatronModule.__init__(self, config)
        self.config = config
        self.layer_number = layer_number
        self.submodules = submodules
        self.ep_group = pg_collection.ep
        self.attn_tp_group = pg_collection.tp
        self.tp_group = pg_collection.tp
        self.num_local_experts = 1
        self.local_expert_indices = [expert_id]
        self.use_shared_expert = config.moe_shared_expert_intermediate_size is not None
        self.shared_expert_overlap = config.moe_shared_expert_overlap
        self.moe_layer_recompute = (
            config.recompute_granularity == "selective"
            and "moe" in config.recompute_modules
            and config.cuda_graph_impl != "local"
        )
        self.shared_experts_recompute = (
            config.recompute_granularity == "selective" and "shared_experts" in config.recompute_modules
        )
        self.router = build_module(submodules.router, config=config, pg_collection=pg_collection, large_ep_config=lep)
        if layer_number is not None:
            self.router.set_layer_number(layer_number)
        self.token_dispatcher = LargeEPTokenDispatcher(
            config=config, pg_collection=pg_collection, ep_rank=ep_rank, placement=placement
        )
        self.experts = build_module(
            submodules.experts, lep, expert_id=expert_id, ep_replica=ep_replica, expt_dp_group=pg_collection.expt_dp
        )
        self.shared_experts = None
        if self.use_shared_expert:
            self.shared_experts = build_module(
                submodules.shared_experts, config=config, pg_collection=pg_collection, gate=config.moe_shared_expert_gate
            )
        self.cudagraph_tensor_store = MoECudaGraphTensorStore()
        self.fwd_execution_map = ["route", "expert_compute", "postprocess"]

        self.large_ep_config = lep
        self.expert_id = expert_id
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.placement = placement
        self._replicated = replicated

    @property
    def last_stats(self) -> LoadStats | None:
        return self.router.last_stats

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors: Any = None, padding_mask: Any = None) -> Any:
        if self._replicated and self.training and torch.is_grad_enabled():
            raise NotImplementedError(
                "training with experts replicated inside the EP group needs their gradients reduced over each "
                "expert's replica group, which Megatron's DDP does not do; this placement runs forward only"
            )
        return super().forward(hidden_states, intermediate_tensors, padding_mask)


def _check_submodules(submodules: MoESubmodules) -> None:
    for slot, base in (("router", LargeEPRouter), ("experts", LargeEPExperts)):
        spec = getattr(submodules, slot)
        cls = getattr(spec, "module", spec)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ValueError(
                f"MoESubmodules.{slot}={spec!r}: the large-EP layer needs {base.__name__} (or a subclass) there"
            )


def large_ep_moe_layers(model: Any) -> Iterator[tuple[str, LargeEPMoELayer]]:
    """Every ``LargeEPMoELayer`` of a model (a module or a list of model chunks), named ``layer_<number>`` by
    Megatron's global layer number so that the names are unique across pipeline stages."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, LargeEPMoELayer):
                yield (f"layer_{module.layer_number}" if module.layer_number is not None else name), module
