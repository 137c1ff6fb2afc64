"""Turn DeepSpeed's stock MoE layers into large-EP layers that DeepSpeed's engine still treats as MoE.

Shape legend:
    T  tokens      H  hidden size      F  expert ffn hidden size      E  experts

DeepSpeed's engine treats only ``isinstance(module, deepspeed.moe.layer.MoE)`` as an MoE layer: expert gradient
reduction over the expert-data-parallel group, one checkpoint file per expert, MoE parameter groups for ZeRO.
So the converted layer, ``LargeEPDeepSpeedMoE``, *is* a ``MoE`` subclass that holds a ``LargeEPMoE`` as
``deepspeed_moe`` and keeps DeepSpeed's contract:

* ``forward(x) -> (y, l_aux, exp_counts)`` like the stock layer (``l_aux`` is the large-EP aux + z loss, already
  scaled by its coefficients: 0 when they are off; ``exp_counts`` the global tokens per expert).
* attributes ``num_experts``, ``ep_size``, ``num_local_experts`` (1, unless the placement colocates experts), ``expert_group_name``.
* expert parameters carry ``allreduce = False`` and ``group_name = "ep_size_N"``.
* state-dict names follow the stock layout, which the engine's checkpoint code parses::

      deepspeed_moe.gate.wg.weight                          router weight [E, H]   (non-expert file)
      deepspeed_moe.gate.selection_bias                     balancing bias [E]     (non-expert file)
      deepspeed_moe.experts.deepspeed_experts.0.fc1.weight  expert [F, H]          (per-expert file)
      deepspeed_moe.experts.deepspeed_experts.0.fc2.weight  expert [H, F]          (per-expert file)

  (the bias must not have "expert" in its name, or the engine would file it as an expert parameter; for the same
  reason a shared expert is ``deepspeed_moe.shared_mlp.*`` and its gate ``deepspeed_moe.shared_mlp_gate.*``, and
  colocated experts are ``deepspeed_moe.experts.deepspeed_experts.<slot>.*``). ``tag_expert_params``,
  ``use_stock_names`` and ``check_engine_group`` also serve the Hugging Face blocks (``hf_blocks.py``).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from largeep_plugin.layer.comm import ProcessGroup, group_rank, group_size
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.experts import is_gated
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.placement.plan import Placement
from largeep_plugin.layer.process_groups import ExpertProcessGroups
from largeep_plugin.integrations.section.config import LargeEPSection, layer_fields

STOCK_PREFIX = "deepspeed_moe."  # where the engine's checkpoint code looks for a layer's tensors

ExpertConverter = Callable[[nn.Module], tuple[str, dict[str, torch.Tensor]]]
"""``converter(stock_expert) -> (activation, ExpertMLP state dict)`` for experts the default cannot read. Values
that are the stock expert's own Parameters let optimizer groups built on the stock model follow the conversion."""


class LargeEPDeepSpeedMoE(MoE):
    """A ``deepspeed.moe.layer.MoE`` whose work is done by the ``LargeEPMoE`` it holds as ``deepspeed_moe``.

    Build it with ``convert_moe_layers`` (which copies a stock layer's weights) or directly from a ``LargeEPMoE``
    whose EP group is DeepSpeed's group ``ep_size_<N>``.
    """

    def __init__(self, layer: LargeEPMoE):
        # MoE.__init__ would build a stock gate and stock experts: skip it and set what the engine reads.
        nn.Module.__init__(self)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = layer.ep_size
        self.expert_group_name = f"ep_size_{layer.ep_size}"
        self.num_experts = layer.config.num_experts
        self.num_local_experts = len(layer.expert_ids)
        self.deepspeed_moe = layer
        tag_expert_params(layer, self.expert_group_name)
        use_stock_names(self, "deepspeed_moe", layer)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine. The EP group was made before conversion; check the engine sees the same one."""
        check_engine_group(self.expert_group_name, self.deepspeed_moe)

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):  # type: ignore[override]
        if used_token is not None:
            raise NotImplementedError("LargeEPDeepSpeedMoE does not support used_token masks")
        y, aux = self.deepspeed_moe(hidden_states, return_aux=True)
        return y, aux, self.deepspeed_moe.last_stats.tokens_per_expert_E


def check_engine_group(group_name: str, layer: LargeEPMoE) -> None:
    """RuntimeError unless DeepSpeed's expert-parallel group ``group_name`` is ``layer``'s EP group (size and rank)."""
    if group_name not in groups._get_expert_parallel_group_dict():
        raise RuntimeError(
            f"DeepSpeed has no expert-parallel group {group_name!r}: build large-EP layers through "
            "largeep_plugin.integrations.deepspeed.engine.initialize, which creates it before converting"
        )
    engine_group = groups._get_expert_parallel_group(group_name)
    if group_size(engine_group) != layer.ep_size or group_rank(engine_group) != layer.ep_rank:
        raise RuntimeError(f"DeepSpeed's group {group_name!r} differs from the layer's EP group")


def tag_expert_params(layer: LargeEPMoE, group_name: str) -> None:
    """What DeepSpeed's engine reads off an expert parameter: ``allreduce = False`` (not averaged over the data-
    parallel group) and ``group_name`` (its expert-data-parallel group ``ep_size_N``)."""
    for _, expert in layer.local_experts():
        for p in expert.parameters():
            p.allreduce = False
            p.group_name = group_name


def _stock_renames(layer: LargeEPMoE) -> tuple[tuple[str, str], ...]:
    """(name inside the ``LargeEPMoE``, name in the stock layout under ``deepspeed_moe.``); first match wins.
    The engine files every key of an MoE module with "expert" in it (but the gate's ``wg.weight``) as an expert
    tensor: the bias and a shared expert must lose the word, the experts get the stock per-expert names."""
    experts = ("experts.", "experts.deepspeed_experts.") if layer.colocated else \
        ("expert.", "experts.deepspeed_experts.0.")
    return (("router.weight", "gate.wg.weight"), ("router.expert_bias", "gate.selection_bias"), experts,
            ("shared_expert_gate.", "shared_mlp_gate."), ("shared_expert.", "shared_mlp."))


def _rename(key: str, old: str, new: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``old + a`` -> ``new + b`` for the first pair (a, b) whose a starts the rest of the key; other keys under
    ``old`` just move under ``new``."""
    rest = key[len(old):]
    for a, b in pairs:
        if rest.startswith(a):
            return new + b + rest[len(a):]
    return new + rest


def use_stock_names(module: nn.Module, attr: str, layer: LargeEPMoE) -> None:
    """Give ``module`` (which holds ``layer`` as ``module.<attr>``) a state dict in the stock layout the engine's
    checkpoint code parses (the module docstring), and load that layout back."""
    to_stock = _stock_renames(layer)
    back = tuple((b, a) for a, b in to_stock)

    def save_hook(_module: nn.Module, state_dict: dict, prefix: str, _local_metadata: dict) -> None:
        for key in [k for k in state_dict if k.startswith(f"{prefix}{attr}.")]:
            state_dict[_rename(key, f"{prefix}{attr}.", prefix + STOCK_PREFIX, to_stock)] = state_dict.pop(key)

    def load_hook(_module: nn.Module, state_dict: dict, prefix: str, *_args: object) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + STOCK_PREFIX)]:
            state_dict[_rename(key, prefix + STOCK_PREFIX, f"{prefix}{attr}.", back)] = state_dict.pop(key)

    module.register_state_dict_post_hook(save_hook)
    module.register_load_state_dict_pre_hook(load_hook)


# ---- conversion ----------------------------------------------------------------------------------------------
def gelu_mlp_expert(expert: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """Read a stock expert made of two ``nn.Linear`` (H -> F, then F -> H, in registration order) around one exact
    ``nn.GELU``: the usual ``nn.Sequential(Linear, GELU, Linear)``. Anything else is NotImplementedError."""
    linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    acts = [m for m in expert.modules() if isinstance(m, (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid))]
    if len(linears) != 2 or len(acts) != 1 or not isinstance(acts[0], nn.GELU) or acts[0].approximate != "none":
        raise NotImplementedError(
            f"cannot read expert {type(expert).__name__}: the default converter needs exactly two nn.Linear and one "
            f"exact nn.GELU (found {len(linears)} Linear, activations {[type(a).__name__ for a in acts]}); pass "
            "expert_converter= to initialize/convert_moe_layers for other experts"
        )
    fc1, fc2 = linears
    if fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features:
        raise NotImplementedError(
            f"expert linears {fc1.in_features}->{fc1.out_features} and {fc2.in_features}->{fc2.out_features} are not "
            "an H->F->H MLP"
        )
    if (fc1.bias is None) != (fc2.bias is None):
        raise NotImplementedError("expert linears must both have a bias or both have none")
    # The stock Parameters themselves (not copies): the caller maps optimizer groups by their identity.
    state = {"fc1.weight": fc1.weight, "fc2.weight": fc2.weight}
    if fc1.bias is not None:
        state.update({"fc1.bias": fc1.bias, "fc2.bias": fc2.bias})
    return "gelu", state


def _stock_top_k(stock: MoE) -> int:
    return int(stock.deepspeed_moe.gate.k)


def _warn_dropped_features(name: str, stock: MoE) -> None:
    gate = stock.deepspeed_moe.gate
    dropped = []
    if gate.noisy_gate_policy not in (None, "None"):
        dropped.append(f"noisy_gate_policy={gate.noisy_gate_policy!r}")
    if getattr(gate, "top2_2nd_expert_sampling", False) and gate.k == 2:
        dropped.append("top2_2nd_expert_sampling=True")
    if gate.drop_tokens and gate.use_rts:
        dropped.append("use_rts=True")
    if dropped:
        warnings.warn(
            f"{name}: the large-EP layer routes deterministically (top-k of the scores); the stock gate's "
            f"{', '.join(dropped)} does not carry over", stacklevel=3,
        )


def convert_stock_layer(
    stock: MoE, section: LargeEPSection, ep_group: ProcessGroup, *, expert_converter: ExpertConverter | None = None,
    name: str = "MoE", placement: Placement | None = None, ranks_per_node: int | None = None,
    expert_groups: ExpertProcessGroups | None = None,
) -> tuple[LargeEPDeepSpeedMoE, dict[int, nn.Parameter]]:
    """Convert one stock layer, keeping its weights: gate -> router, the expert this rank holds -> the large-EP
    expert (expert e on EP rank e, or ``placement.rank_to_expert[EP rank]`` with a placement).

    Returns the new layer and ``{id(old parameter): new parameter}`` for the parameters that carried over (so
    optimizer parameter groups built on the stock model can be mapped). With a placement and a stock model built
    with ``ep_size=N`` this is collective over ``ep_group`` (expert weights move to the rank that now holds them).
    """
    if stock.use_residual:
        raise NotImplementedError(f"{name}: residual MoE (use_residual=True) has no large-EP equivalent yet")
    if stock.enable_expert_tensor_parallelism:
        raise NotImplementedError(f"{name}: expert tensor parallelism is not supported by the DeepSpeed adapter yet")
    ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)
    if stock.num_experts != ep_size:
        raise NotImplementedError(
            f"{name} has {stock.num_experts} experts but large_ep.ep_size={ep_size}: the large-EP layer holds one "
            "expert per rank, so ep_size must equal the number of experts"
        )
    expert_id = ep_rank if placement is None else placement.rank_to_expert[ep_rank]
    # Which of the stock layer's local experts is the one this rank holds from now on.
    if stock.ep_size == 1:
        local = expert_id  # the stock layer holds every expert on every rank
    elif stock.ep_size == ep_size:
        local = 0  # one expert per rank: stock expert e is on EP rank e (moved below when the placement permutes)
    else:
        raise NotImplementedError(
            f"{name} was built with ep_size={stock.ep_size}; converting to large_ep.ep_size={ep_size} would move "
            f"expert weights between ranks: build the stock model with ep_size=1 or ep_size={ep_size}"
        )
    _warn_dropped_features(name, stock)
    gate_weight = stock.deepspeed_moe.gate.wg.weight
    stock_expert = stock.deepspeed_moe.experts.deepspeed_experts[local]
    activation, expert_state = (expert_converter or gelu_mlp_expert)(stock_expert)
    stock_params = {k: v for k, v in expert_state.items() if isinstance(v, nn.Parameter)}
    if placement is not None and stock.ep_size == ep_size:
        expert_state = _fetch_expert(expert_state, expert_id, ep_group)
    fields = dict(layer_fields(section))
    top_k = fields.setdefault("top_k", _stock_top_k(stock))
    fc1_rows = expert_state["fc1.weight"].shape[0]
    cfg = LargeEPConfig(
        hidden_size=gate_weight.shape[1],
        ffn_hidden_size=fc1_rows // 2 if is_gated(activation) else fc1_rows,
        num_experts=stock.num_experts,
        activation=activation,
        # DeepSpeed's top-1 gate weights the expert by its raw probability; top-2 and top-k renormalise.
        normalize_topk=top_k > 1,
        linear_bias="fc1.bias" in expert_state,
        **fields,
    )
    layer = LargeEPMoE(cfg, ep_group, placement=placement, ranks_per_node=ranks_per_node, expert_groups=expert_groups)
    with torch.no_grad():
        layer.router.weight.copy_(gate_weight)
        layer.expert.load_state_dict(expert_state)
    layer.to(device=gate_weight.device)
    layer.expert.to(dtype=expert_state["fc1.weight"].dtype)
    # Parameters that carried over, for remapping optimizer parameter groups built on the stock model.
    mapping = {id(gate_weight): layer.router.weight}
    new_params = dict(layer.expert.named_parameters())
    for key, value in stock_params.items():
        mapping[id(value)] = new_params[key]
    return LargeEPDeepSpeedMoE(layer), mapping


@torch.no_grad()
def _fetch_expert(state: dict[str, torch.Tensor], expert_id: int, ep_group: ProcessGroup) -> dict[str, torch.Tensor]:
    """The expert state of EP rank ``expert_id`` (where a stock model built with ``ep_size=N`` holds expert
    ``expert_id``), gathered over ``ep_group``: every rank sends its own expert and keeps the one it now holds.
    A one-time cost at conversion; keys in sorted order so every rank runs the same collectives."""
    out = {}
    for key in sorted(state):
        mine = state[key].detach().contiguous()
        gathered = [torch.empty_like(mine) for _ in range(group_size(ep_group))]
        dist.all_gather(gathered, mine, group=ep_group)
        out[key] = gathered[expert_id]
    return out


def convert_moe_layers(
    model: nn.Module, section: LargeEPSection, ep_group: ProcessGroup, *,
    expert_converter: ExpertConverter | None = None, placement: Placement | None = None,
    ranks_per_node: int | None = None, expert_groups: ExpertProcessGroups | None = None,
) -> dict[int, nn.Parameter]:
    """Replace, in place, every stock ``deepspeed.moe.layer.MoE`` of ``model`` by a ``LargeEPDeepSpeedMoE``
    (all with the same ``placement``, node size and groups; see ``convert_stock_layer``).

    Returns ``{id(old parameter): new parameter}`` over all converted layers. Raises ValueError when the model
    has no stock MoE layer (the flag would then do nothing, which is surely not what was meant).
    """
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, MoE) and not isinstance(module, LargeEPDeepSpeedMoE)
    ]
    if not targets:
        raise ValueError("large_ep.enabled is true but the model has no deepspeed.moe.layer.MoE layer to convert")
    if model in (m for _, m in targets):
        raise NotImplementedError("the model itself is an MoE layer: wrap it in a parent module to convert it")
    mapping: dict[int, nn.Parameter] = {}
    for name, stock in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new, layer_mapping = convert_stock_layer(stock, section, ep_group, expert_converter=expert_converter,
                                                 name=name, placement=placement, ranks_per_node=ranks_per_node,
                                                 expert_groups=expert_groups)
        setattr(parent, child, new)
        mapping.update(layer_mapping)
    return mapping
