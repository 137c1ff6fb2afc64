"""The large-EP MoE layer inside Megatron-Core: a ``MoELayer`` subclass with the plugin's router, dispatcher and
expert, injected through ``ModuleSpec`` (see ``integrations/megatron/specs.py``).

Shape legend:
    S  sequence length (local: / TP under sequence parallelism)      B  micro-batch size      H  hidden size
    E  experts      M  rows this rank's expert receives

Megatron's own stage methods (``route``, ``preprocess``, ``dispatch``, ``routed_experts_compute``, ``combine``,
``postprocess``) and its ``forward`` are inherited unchanged: they call ``self.router`` (``LargeEPRouter``),
``self.token_dispatcher`` (``LargeEPTokenDispatcher``) and ``self.experts`` (``LargeEPExperts``), so Megatron's
EP overlap can drive the layer stage by stage. Only ``__init__`` is the plugin's.

Process groups come from ``pg_collection`` (Megatron's ``TransformerLayer`` passes it only to the exact stock
classes, so the default collection of ``parallel_state`` is used unless a spec passes one in ``params``):
EP = ``ep`` (Megatron's expert-model-parallel group), expert-TP = ``expt_tp``, expert-DP = ``expt_dp`` (Megatron's
DDP reduces the expert gradients over it: they carry ``allreduce=False``).

Expert tensor parallelism (``expert_tensor_parallel_size`` t > 1): EP rank r holds shard j = its ``expt_tp`` rank
of its expert (``ExpertMLP(tp_rank=j, tp_size=t)``: fc1 rows, fc2 columns, fc2's bias on shard 0), and the tokens
move over ``tp_ep``, Megatron's group of the EP x expert-TP ranks, in which the t shards of EP rank r are ranks
r*t .. r*t+t-1 (Megatron's rank generator varies the expert-TP rank fastest; checked here). Every (token, k) goes
to all t shards and the combine adds their partial outputs (``LargeEPTokenDispatcher``). A placement still lists
the experts of each EP rank; colocated and replicated placements are refused with t > 1, and so is the
distributed checkpoint of the shards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoECudaGraphTensorStore, get_default_pg_collection
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import get_pg_rank, get_pg_size

from largeep_plugin.layer.clones import CloneSlots
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.expert_slots import rank_to_experts_of
from largeep_plugin.layer.load_balance import LoadStats
from largeep_plugin.layer.moves import HomeMoves
from largeep_plugin.layer.notices import warn_once
from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import Topology
from .checkpoint import replica_index
from .config import large_ep_config_from_megatron
from .dispatcher import LargeEPTokenDispatcher
from .experts import LargeEPExperts
from .router import LargeEPRouter


class LargeEPMoELayer(MoELayer):
    """Megatron ``MoELayer`` whose routing, token movement and expert are the plugin's.

    Args:
        config: Megatron's ``TransformerConfig`` (translated once by ``large_ep_config_from_megatron``).
        submodules: ``MoESubmodules`` with ``router`` a ``LargeEPRouter`` and ``experts`` a ``LargeEPExperts``
            (class or ``ModuleSpec``); ``shared_experts`` is built as Megatron builds it. None: the plugin's.
        layer_number: Megatron's 1-based global layer number.
        pg_collection: Megatron's process groups (None: the default collection).
        large_ep: ``LargeEPConfig`` overrides (plugin-only fields; see ``integrations/megatron/config.py``).
        placement: which experts each EP rank holds (``largeep_plugin.placement.plan``); None: expert e on EP rank e.
            Replicas (EP > experts) train once their gradients are summed over the replicas (Megatron's DDP with
            ``enable_replica_gradient_sum``, or ``GlooDataParallel``; forward only otherwise); colocated experts (several on a rank, e.g.
            ``rank_to_experts=((0, 1), (2, 3))``) train too, with flat dispatch (a warning says so once).

    Attributes (besides ``MoELayer``'s): ``large_ep_config``, ``expert_ids``, ``expert_id`` (NotImplementedError
    when the rank holds several), ``ep_rank``, ``ep_size``, ``last_stats`` (the router's ``LoadStats`` of the
    latest forward), ``clones`` (``dynamic_replicas``: the ``CloneSlots``, else None), ``moves`` (``replace_every``:
    the ``HomeMoves`` whose window the dispatcher fills, else None). ``home_layout()``, ``local_experts()`` and
    ``relabel_homes(home)`` are what ``largeep_plugin.move_experts`` / ``rebalance`` need of a layer.
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
        if getattr(placement, "expert_tp_degree", 1) != 1:
            raise NotImplementedError(f"placement.expert_tp_degree={placement.expert_tp_degree}: inside Megatron the "
                                      "experts are split by expert_tensor_parallel_size; the placement lists whole "
                                      "experts per EP rank (expert_tp_degree=1)")
        rank_to_experts = rank_to_experts_of(lep.num_experts, ep_size, placement, experts_field="num_moe_experts",
                                             ep_what="the expert-model-parallel size is {}")
        expert_ids = rank_to_experts[ep_rank]
        colocated = max(len(h) for h in rank_to_experts) > 1
        replicated = sum(len(h) for h in rank_to_experts) > lep.num_experts
        if colocated:
            warn_once(f"LargeEPMoELayer: {lep.num_experts} experts on {ep_size} EP ranks, "
                      f"rank_to_experts={rank_to_experts} (colocated experts run one after another on a rank)",
                      key=("megatron colocated", rank_to_experts))
        expt_tp, expt_tp_rank = get_pg_size(pg_collection.expt_tp), get_pg_rank(pg_collection.expt_tp)
        if expt_tp != 1:
            _check_expert_tp(pg_collection, ep_size, ep_rank, expt_tp, expt_tp_rank, colocated, replicated)
            if get_pg_size(pg_collection.tp) > 1 and not config.sequence_parallel:
                # Without sequence parallelism the attention-TP ranks hold the same tokens: each would dispatch
                # them again, and every expert would see (and take the gradient of) each token several times.
                raise NotImplementedError(
                    f"expert_tensor_parallel_size={expt_tp} with tensor_model_parallel_size="
                    f"{get_pg_size(pg_collection.tp)} needs sequence_parallel=True")

        # BaseMoELayer.__init__ asserts num_experts % EP == 0 and gives each rank a contiguous block of experts;
        # under a placement an EP rank holds whichever experts the placement says (replicas when EP > E, colocated
        # experts when EP < E), so the attributes BaseMoELayer and MoELayer set are set here, for those experts.
        MegatronModule.__init__(self, config)
        self.config = config
        self.layer_number = layer_number
        self.submodules = submodules
        self.ep_group = pg_collection.ep
        self.attn_tp_group = pg_collection.tp
        self.tp_group = pg_collection.tp
        self.num_local_experts = len(expert_ids)
        self.local_expert_indices = list(expert_ids)
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
            config=config, pg_collection=pg_collection, ep_rank=ep_rank, placement=placement,
            rank_to_experts=rank_to_experts if colocated else None, expert_tp_size=expt_tp,
        )
        # The router's global load and input checks ride in the dispatcher's count exchange (one collective fewer)
        # whenever no switch loss needs them during the router's forward.
        self.router.counts_in_dispatch = True
        self.token_dispatcher.count_source = self.router
        self.experts = build_module(
            submodules.experts, lep, expert_ids=expert_ids,
            ep_replicas=[replica_index(rank_to_experts, ep_rank, e) for e in expert_ids],
            expt_dp_group=pg_collection.expt_dp, colocated=colocated, tp_rank=expt_tp_rank, tp_size=expt_tp,
        )
        self.experts.count_source = self.token_dispatcher
        self.experts.home = rank_to_experts
        self.experts.ep_rank = ep_rank
        self.clones: CloneSlots | None = None
        if lep.dynamic_replicas > 0:
            self._add_clones(lep, rank_to_experts, ep_rank, ep_size, placement, expt_tp)
        self.moves: HomeMoves | None = None
        if lep.replace_every > 0:
            self._add_moves(lep, ep_rank, ep_size, placement, expt_tp, replicated)
        self.shared_experts = None
        if self.use_shared_expert:
            self.shared_experts = build_shared_experts(submodules, config, pg_collection)
            if self.shared_expert_overlap:
                # MoELayer then leaves the shared expert to the dispatcher: ours runs it while the tokens'
                # all-to-all is in flight and adds its output in combine_postprocess.
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        self.cudagraph_tensor_store = MoECudaGraphTensorStore()
        self.fwd_execution_map = ["route", "expert_compute", "postprocess"]

        self.large_ep_config = lep
        self.expert_ids = expert_ids
        self.rank_to_experts = rank_to_experts
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.placement = placement
        self.replicated = replicated
        # Set by whatever sums replicated experts' gradients over their replicas (GlooDataParallel,
        # enable_replica_gradient_sum).
        self.replica_grads_summed = False
        # {expert id: group of its replicas in the EP group}, set by replicas.attach_replica_groups.
        self.replica_groups: dict[int, Any] | None = None

    def _add_clones(self, lep: LargeEPConfig, rank_to_experts: Any, ep_rank: int, ep_size: int, placement: Any,
                    expt_tp: int) -> None:
        """Spare slots for clones of hot experts (``dynamic_replicas``): the dispatcher routes by the plan, the
        experts run the clones beside the homes, ``largeep_plugin.rebalance(model)`` (the optimizer hook of
        ``install_bias_update_hook``) refreshes and re-plans them."""
        if expt_tp != 1:
            raise ValueError(f"dynamic_replicas={lep.dynamic_replicas} with expert_tensor_parallel_size={expt_tp} is "
                             "not supported: a clone is a whole expert")
        if self.config.overlap_moe_expert_parallel_comm:
            raise NotImplementedError(
                f"dynamic_replicas={lep.dynamic_replicas} with overlap_moe_expert_parallel_comm=True: Megatron's "
                "fine-grained EP overlap backpropagates the experts' node on its own, before the clones' gradients "
                "can return to their homes; turn one of them off")
        topology = getattr(placement, "topology", None) or Topology.uniform(1, ep_size)
        self.clones = CloneSlots(lep, ep_group=self.ep_group, ep_rank=ep_rank, home=rank_to_experts,
                                 topology=topology, template=self.experts.experts_by_id()[0][1])
        # The distributed checkpoint keeps the load history, not the plan (sharded_state_dict): a load plans afresh.
        self.clones.register_load_state_dict_pre_hook(self._clone_plan_missing)
        self.clones.register_load_state_dict_post_hook(self._clone_plan_from_history)
        self._replan_clones = False
        # Plain references, not submodules: the slots belong to this layer's state dict once.
        object.__setattr__(self.experts, "clones", self.clones)
        object.__setattr__(self.router, "load_observer", self.clones)
        self.token_dispatcher.use_clones(self.clones, rank_to_experts)

    def _add_moves(self, lep: LargeEPConfig, ep_rank: int, ep_size: int, placement: Any, expt_tp: int,
                   replicated: bool) -> None:
        """Live re-placement (``replace_every``): the dispatcher counts each training forward's co-activation and
        link rows into ``self.moves``; ``largeep_plugin.rebalance(model, optimizer)`` (the optimizer hook of
        ``install_bias_update_hook``) decides and moves the home experts with their optimizer state."""
        if expt_tp != 1:
            raise NotImplementedError(f"replace_every={lep.replace_every} with expert_tensor_parallel_size={expt_tp} "
                                      "is not supported (an expert split over ranks moves as one): set replace_every=0")
        if replicated:
            raise NotImplementedError(
                f"replace_every={lep.replace_every} with static replicas ({ep_size} EP ranks for {lep.num_experts} "
                "experts) is not supported: their replica groups are process groups fixed at construction; use "
                "dynamic_replicas for hot experts, or set replace_every=0")
        topology = getattr(placement, "topology", None) or Topology.uniform(1, ep_size)
        self.moves = HomeMoves(lep, ep_group=self.ep_group, ep_rank=ep_rank, topology=topology)
        self.token_dispatcher.moves = self.moves

    @property
    def expert_dp_group(self) -> Any:
        """Megatron's expert-data-parallel group: the ranks holding this EP rank's experts in every data-parallel
        copy (moves decide alike in all of them: ``rebalance(..., dp_group=layer.expert_dp_group)``)."""
        return self.experts.expt_dp_group

    def home_layout(self) -> tuple[tuple[int, ...], ...]:
        """[R] the experts of every EP rank today (the placement's, or what moves made of it)."""
        return self.rank_to_experts

    def local_experts(self) -> list[tuple[int, nn.Module]]:
        """(expert id, ``ExpertMLP``) of this rank's home experts, in slot order."""
        return self.experts.experts_by_id()

    @torch.no_grad()
    def relabel_homes(self, home: tuple[tuple[int, ...], ...]) -> None:
        """Say that the home slots now hold ``home`` ([R], the same number per rank, each expert once): the
        experts' ids, routing (the dispatcher's placement and slot table), the clone plan and the checkpoint keys
        follow. Only the bookkeeping: ``moves.move_experts`` moved the weights and optimizer state first."""
        home = tuple(tuple(int(x) for x in h) for h in home)
        self.rank_to_experts = home
        self.expert_ids = home[self.ep_rank]
        self.local_expert_indices = list(self.expert_ids)
        self.experts.relabel(home)
        topology = getattr(self.placement, "topology", None) or Topology.uniform(1, self.ep_size)
        self.placement = Placement(topology=topology, num_experts=self.large_ep_config.num_experts,
                                   rank_to_experts=home)
        self.token_dispatcher.relabel(home, self.placement)
        if self.clones is not None:
            self.clones.relabel_homes(home)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Megatron's, less the clones' plan: ``plan_clones_RS`` is [EP size, spare slots], so another EP size could
        not load it. The load history (``clones.load_ema_E``, ``clones.plan_load_E``, by expert id, replicated:
        the first data-parallel copy's is stored) is kept, and a load plans the clones afresh from it for this EP
        size; the next forward refreshes their weights."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.clones is not None:
            out.pop(f"{prefix}clones.plan_clones_RS", None)
        return out

    def _clone_plan_missing(self, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        # A distributed checkpoint's state has no plan (sharded_state_dict): stand the current one in, re-plan after.
        key = f"{prefix}plan_clones_RS"
        if key not in state_dict and f"{prefix}load_ema_E" in state_dict:
            state_dict[key] = module.plan_clones_RS.clone()
            self._replan_clones = True

    def _clone_plan_from_history(self, module: nn.Module, _incompatible: Any) -> None:
        if self._replan_clones:
            self._replan_clones = False
            if float(module.load_ema_E.sum()) > 0:
                module.replan_from(module.load_ema_E.clone())

    def large_ep_clones(self) -> tuple[CloneSlots, list[nn.Module]] | None:
        """(the clone slots, the home experts in slot order) with dynamic replicas, else None (``rebalance``)."""
        if self.clones is None:
            return None
        return self.clones, [m for _, m in self.experts.experts_by_id()]

    @property
    def expert_id(self) -> int:
        """The expert of this rank, when it holds exactly one (NotImplementedError otherwise)."""
        return self.experts.expert_id

    @property
    def last_stats(self) -> LoadStats | None:
        return self.router.last_stats

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors: Any = None, padding_mask: Any = None) -> Any:
        if self.replicated and not self.replica_grads_summed and self.training and torch.is_grad_enabled():
            raise NotImplementedError(
                "training with experts replicated inside the EP group needs their gradients summed over each "
                "expert's replicas, which Megatron's DDP does not do: call "
                "largeep_plugin.megatron.enable_replica_gradient_sum(model, config) after wrapping the model in "
                "Megatron's DDP (its finalize_model_grads_func then sums them), wrap it in GlooDataParallel on CPU "
                "(its finish_grad_sync sums them), or run this placement forward only"
            )
        return super().forward(hidden_states, intermediate_tensors, padding_mask)


def build_shared_experts(submodules: MoESubmodules, config: Any, pg_collection: Any) -> nn.Module:
    """Megatron's shared expert module from the spec. With ``moe_shared_expert_overlap`` Megatron's
    ``SharedExpertMLP`` would create a CUDA stream and split its forward into stream-bound pieces; the large-EP
    dispatcher overlaps it on any device by running its plain forward while the token all-to-all is in flight
    (``comm.all_to_all(during=...)``), so the module is built as without the overlap."""
    if submodules.shared_experts is None:
        raise ValueError("moe_shared_expert_intermediate_size is set but MoESubmodules.shared_experts is None: "
                         "build the layer spec with the same config (get_gpt_layer_spec_with_large_ep or "
                         "get_gpt_decoder_block_spec_with_large_ep keep Megatron's shared-expert spec)")
    build_config = dataclasses.replace(config, moe_shared_expert_overlap=False) if config.moe_shared_expert_overlap \
        else config
    return build_module(submodules.shared_experts, config=build_config, pg_collection=pg_collection,
                        gate=config.moe_shared_expert_gate)


def _check_expert_tp(pg_collection: Any, ep_size: int, ep_rank: int, expt_tp: int, expt_tp_rank: int,
                     colocated: bool, replicated: bool) -> None:
    """Raise unless the dispatch over ``tp_ep`` can reach the t shards of EP rank r at its ranks r*t .. r*t+t-1."""
    if colocated or replicated:
        raise NotImplementedError(
            f"expert_tensor_parallel_size={expt_tp} with a {'colocated' if colocated else 'replicated'} placement: "
            "under expert tensor parallelism the large-EP layer runs one expert per EP rank"
        )
    tp_ep = getattr(pg_collection, "tp_ep", None)
    if tp_ep is None:
        raise ValueError(f"expert_tensor_parallel_size={expt_tp}: pg_collection has no tp_ep group (the EP x "
                         "expert-TP ranks the tokens are dispatched over)")
    size, rank = get_pg_size(tp_ep), get_pg_rank(tp_ep)
    # Each rank checks its own position; together they say the group is EP-major with the t shards consecutive.
    if size != ep_size * expt_tp or rank != ep_rank * expt_tp + expt_tp_rank:
        raise ValueError(
            f"pg_collection.tp_ep: this rank is {rank} of {size}, but EP rank {ep_rank} of {ep_size} with "
            f"expert-TP rank {expt_tp_rank} of {expt_tp} must be rank {ep_rank * expt_tp + expt_tp_rank} of "
            f"{ep_size * expt_tp} (the expert-TP rank varying fastest, as Megatron's parallel_state orders it)"
        )


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
