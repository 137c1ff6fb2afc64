"""DeepSpeed integration: ``initialize``, a drop-in for ``deepspeed.initialize`` driven by the ``"large_ep"`` section.

    from largeep_plugin.integrations.deepspeed.engine import initialize
    engine, optimizer, loader, scheduler = initialize(model=model, model_parameters=params, config="ds.json")

With ``"large_ep": {"enabled": true, "ep_size": 16, ...}`` in the config (see ``integrations/section/config.py``;
``"ep_size": "auto"`` is resolved against the world size and the model's experts, and logged by rank 0) it:
1. initialises DeepSpeed's communication if needed and creates DeepSpeed's expert-parallel groups
   ``ep_size_<N>`` (so the engine and the large-EP layers share one group layout);
2. converts every ``deepspeed.moe.layer.MoE`` of the model into a ``LargeEPDeepSpeedMoE`` keeping its weights
   (gate -> router, expert e -> rank e of its EP group, or where ``placement.topology_file`` plans it:
   ``integrations/deepspeed/placement.py``), see ``integrations/deepspeed/convert.py``; or, for a Hugging Face
   model, every MoE block of a registered family through ``largeep_plugin.hf.convert_model``, made what the
   engine needs at the config's ZeRO stage (``integrations/deepspeed/hf_blocks.py``);
3. maps ``model_parameters`` (parameters or parameter groups built on the unconverted model) onto the converted
   parameters and splits them into DeepSpeed's MoE parameter groups (needed by ZeRO stages 1 to 3);
4. calls ``deepspeed.initialize`` and hooks the optimizer so that every optimizer step is followed by the
   balancing-bias update of each layer, ``largeep_plugin.rebalance`` of the layers with ``"dynamic_replicas"``
   (their clones refreshed from the new weights, re-planned every ``"rebalance_every"`` steps; under ZeRO 3 with
   the home experts gathered) and a monitor record, when configured (a loaded checkpoint's plan gets its clones
   refreshed by the first forward after it); clipping at ZeRO 0 and the
   attached auxiliary losses follow the engine (``knobs.py``).

Without the section, or with ``"enabled": false``, it calls ``deepspeed.initialize`` with exactly the arguments
it was given: the model stays stock. The section is parsed strictly either way, and a top-level key that looks
like a misspelt ``"large_ep"`` (or ``"large_ep"`` with AutoEP's ``"expert_parallel"``) is an error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from typing import Any, Iterable, Iterator

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from largeep_plugin.layer.grads import reduce_expert_gradients
from largeep_plugin.layer.load_balance import LoadMonitor
from largeep_plugin.layer.moe_layer import LargeEPMoE, moe_layers, rebalance, update_layer_biases
from largeep_plugin.placement.plan import Placement
from largeep_plugin.integrations.hf.families import supported_names
from largeep_plugin.integrations.section.config import (AUTO, SECTION, LargeEPSection, check_top_level_keys,
                                                        load_ds_config, parse_large_ep_section, resolve_ep_size)
from .convert import ExpertConverter, LargeEPDeepSpeedMoE, convert_moe_layers
from .hf_blocks import REPLICA_GROUP_ATTR, convert_hf_blocks, hf_moe_blocks, hf_routing
from .knobs import follow_engine
from .training_state import DeepSpeedState
from .placement import (deepspeed_expert_groups, hook_checkpoint_names, plan_section_placement,
                                  resolve_ranks_per_node)

__all__ = ["initialize", "LargeEPDeepSpeedMoE", "large_ep_section", "update_large_ep_biases"]


def _ds_config(args: Any, config: Any) -> dict[str, Any]:
    """The config ``deepspeed.initialize`` would use (``config``, else ``args.deepspeed_config``); {} for none."""
    source = config if config is not None else getattr(args, "deepspeed_config", None)
    return {} if source is None else load_ds_config(source)


def deepspeed_top_level_keys() -> set[str]:
    """DeepSpeed's own top-level config keys (the constants its config parser reads)."""
    from deepspeed.runtime import config as ds_config, constants

    return {v for module in (constants, ds_config) for k, v in vars(module).items()
            if k.isupper() and isinstance(v, str)}


def large_ep_section(args: Any = None, config: Any = None) -> LargeEPSection:
    """The parsed ``"large_ep"`` section of the config ``deepspeed.initialize`` would use (``config``, else
    ``args.deepspeed_config``); disabled when there is no config or no section. A top-level key that looks like a
    misspelt ``"large_ep"``, or ``"large_ep"`` together with AutoEP's ``"expert_parallel"``, is a ValueError
    (``section/config.py``, ``check_top_level_keys``)."""
    raw = _ds_config(args, config)
    check_top_level_keys(raw, deepspeed_top_level_keys())
    return parse_large_ep_section(raw.get(SECTION))


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    *,
    config: Any = None,
    expert_converter: ExpertConverter | None = None,
    placement: Placement | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with the large-EP conversion when the config's ``"large_ep"`` section enables it.

    Converts the model's stock ``deepspeed.moe.layer.MoE`` layers (``convert.py``) or its Hugging Face MoE
    blocks (``hf_blocks.py``: the families of ``largeep_plugin.hf``); a model with both kinds is refused.

    Args:
        args, model, optimizer, model_parameters, config, **kwargs: as for ``deepspeed.initialize``.
        expert_converter: reads stock experts the default converter cannot (see ``convert.ExpertConverter``).
        placement: which EP rank holds which experts, instead of the section's placement files (e.g. planned by
            ``plan_placement`` from a recorded load). For Hugging Face models any layout (several experts per rank,
            replicas of hot experts: these need ``"managed_gradient_accumulation": false`` and ZeRO 0 or 1, and
            their gradients are summed over their replicas before each engine step); for stock layers one expert
            per rank.
    Returns:
        what ``deepspeed.initialize`` returns: (engine, optimizer, training_dataloader, lr_scheduler).
    """
    section = large_ep_section(args, config)
    if not section.enabled:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    config=config, **kwargs)
    if model is None:
        raise ValueError("large_ep.enabled is true but no model was given to initialize")
    _check_monitor(section)
    raw = _ds_config(args, config)
    hf = bool(hf_moe_blocks(model))
    num_experts, top_k = _routing(model, hf)
    section = _resolve_section(section, num_experts)
    given = placement is not None
    files = {k: v for k, v in (("topology_file", section.placement.topology_file),
                               ("load_file", section.placement.load_file)) if v is not None}
    if given and files:
        raise ValueError(f"initialize got a placement and {SECTION}.placement {files}: give one or the other")
    if not given:
        # Planned before any group or collective, identically on every rank (pure function of the files).
        placement = _section_placement(section, num_experts, top_k)
    one_per_rank = placement is not None and all(len(held) == 1 for held in placement.rank_to_experts)
    ranks_per_node = resolve_ranks_per_node(section, placement)
    ep_group = ensure_expert_groups(section.ep_size, bool(raw.get("use_data_before_expert_parallel_", False)))
    if hf:
        mapping, replicated = convert_hf_blocks(
            model, section, raw.get(SECTION), ep_group, placement, _zero_stage(raw), ranks_per_node=ranks_per_node,
            placement_given=given, managed_accumulation=bool(raw.get("managed_gradient_accumulation", True)))
        # Under ZeRO 3 the engine sees no MoE module and would not split the expert groups off itself.
        model_parameters = list(model.parameters()) if model_parameters is None else model_parameters
    else:
        replicated = False
        if section.replace_every:
            raise NotImplementedError(f"{SECTION}.replace_every={section.replace_every} with deepspeed.moe.layer.MoE "
                                      "layers: the engine files their checkpoints by a fixed expert per rank "
                                      "(placement.hook_checkpoint_names), which moves would make wrong; moves run on "
                                      "Hugging Face models, or set replace_every to 0")
        if placement is not None and not one_per_rank:
            raise NotImplementedError("a placement for deepspeed.moe.layer.MoE layers holds one expert per rank; "
                                      "replicas and several experts per rank need a Hugging Face model")
        expert_groups = None if placement is None else deepspeed_expert_groups(placement, ep_group,
                                                                                section.group_name)
        mapping = convert_moe_layers(model, section, ep_group, expert_converter=expert_converter,
                                     placement=placement, ranks_per_node=ranks_per_node,
                                     expert_groups=expert_groups)
    if model_parameters is not None:
        model_parameters = _moe_param_groups(model_parameters, mapping, model)
    outputs = deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                   config=config, **kwargs)
    engine = outputs[0]
    _hook_bias_updates(engine, section, replicated, _zero_stage(raw))
    follow_engine(engine)  # clipping by the model's norm at ZeRO 0; the aux losses scaled as the engine scales the loss
    if one_per_rank:  # per-expert checkpoint files named by expert id; other layouts keep the engine's slot names
        expert_id = placement.rank_to_expert[groups._get_expert_parallel_rank(section.group_name)]
        hook_checkpoint_names(engine, section.group_name, expert_id)
    refuse_engine_checkpoints_after_moves(engine)  # moves by hand too (lep.move_experts), not only replace_every
    engine.large_ep_placement = placement
    return outputs


def refuse_engine_checkpoints_after_moves(engine: Any) -> None:
    """``engine.save_checkpoint`` refuses once experts have moved: the engine files each rank's expert slots by
    rank (stages 0-2) or partition (stage 3), and a fresh engine starts from the placement, not from the moved
    layout, so it would load other experts into the slots. ``training_state.save_training_state`` stores experts
    by id and the layout with them."""
    start = {name: layer.home_layout() for name, layer in moe_layers(engine.module)}
    inner = engine.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        moved = [name for name, layer in moe_layers(engine.module) if layer.home_layout() != start[name]]
        if moved:
            raise NotImplementedError(
                f"engine.save_checkpoint after the experts of {moved[0]} moved (and "
                f"{len(moved) - 1} more layers): the engine's files hold expert slots, not experts; use "
                "largeep_plugin.integrations.deepspeed.save_training_state(path, engine), which stores experts by "
                "id and resumes at any EP size")
        return inner(*args, **kwargs)

    engine.save_checkpoint = save_checkpoint


def _zero_stage(raw: dict[str, Any]) -> int:
    zero = raw.get("zero_optimization", {})
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def _stock_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and not isinstance(m, LargeEPDeepSpeedMoE)]


def _routing(model: nn.Module, hf: bool) -> tuple[int | None, int | None]:
    """(experts per layer, top k) of what ``initialize`` converts (None, None when the stock layers differ);
    ValueError when the model has nothing to convert, NotImplementedError when it has both kinds."""
    stock = _stock_layers(model)
    if hf and stock:
        raise NotImplementedError("the model holds both deepspeed.moe.layer.MoE layers and Hugging Face MoE blocks: "
                                  "large_ep converts one kind per model")
    if hf:
        return hf_routing(model)  # type: ignore[return-value]
    if not stock:
        raise ValueError("large_ep.enabled is true but the model has no deepspeed.moe.layer.MoE layer and no "
                         f"supported Hugging Face MoE block to convert (supported: {', '.join(supported_names())})")
    counts = {m.num_experts for m in stock}
    return (counts.pop() if len(counts) == 1 else None), int(stock[0].deepspeed_moe.gate.k)


def _resolve_section(section: LargeEPSection, num_experts: int | None) -> LargeEPSection:
    """The section with ``ep_size`` an integer for this world and the model's expert count; an ``"auto"`` is
    logged once, by rank 0, so a run's output says which EP size it got."""
    init_deepspeed_comm()
    world = dist.get_world_size()
    ep = resolve_ep_size(section, world, num_experts)
    if section.ep_size == AUTO and dist.get_rank() == 0:
        print(f"largeep: {SECTION}.ep_size=\"{AUTO}\" -> {ep} (world size {world}, data-parallel copies {world // ep})",
              file=sys.stderr, flush=True)
    return dataclasses.replace(section, ep_size=ep)


def _section_placement(section: LargeEPSection, num_experts: int | None, top_k: int | None) -> Placement | None:
    """The section's placement for the model's MoE layers (None without a topology file)."""
    if section.placement.topology_file is None and section.placement.load_file is None:
        return None
    if num_experts is None:
        raise NotImplementedError("the MoE layers have different expert counts: one placement cannot serve them all")
    k = section.top_k if section.top_k is not None else top_k
    return plan_section_placement(section, num_experts, k)


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> dist.ProcessGroup:
    """DeepSpeed's expert-parallel group ``ep_size_<N>`` for this rank, created (with its expert-data-parallel
    groups) if it does not exist yet."""
    init_deepspeed_comm()
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_group(name)


@contextlib.contextmanager
def _quiet_unless_failing() -> Iterator[None]:
    """Capture what is written to file descriptors 1 and 2 (C++ compilers and loaders included) and show it only
    if the block raises. DeepSpeed probes, compiles and loads helper ops at start-up and each rank prints the
    compiler's chatter; on a 16-rank CPU world that buries the output."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


def init_deepspeed_comm() -> None:
    """Initialise DeepSpeed's communication layer (and torch.distributed, when it is not yet), reusing an existing
    torch.distributed backend."""
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    backend = dist.get_backend() if dist.is_initialized() else None
    with _quiet_unless_failing():
        deepspeed.init_distributed(dist_backend=backend)


def load_deepspeed_ops_before_fork() -> None:
    """Load, in the parent process, the helper op DeepSpeed's CPU communication builds at start-up, so that ranks
    forked afterwards find it loaded instead of each probing the compiler (seconds per rank on a busy machine)."""
    from deepspeed.comm.torch import build_shm_op

    with _quiet_unless_failing():
        build_shm_op()


def _moe_param_groups(model_parameters: Any, mapping: dict[int, nn.Parameter | list[nn.Parameter]],
                      model: nn.Module) -> list[dict]:
    """Follow the conversion in the caller's parameters (a list of parameters or of groups): each converted
    parameter (``mapping``: ``{id(old parameter): the new one, or the new ones read from it}``) goes where the
    parameters it was read from were, parameters the model no longer has are dropped; then split the expert
    parameters into DeepSpeed's MoE groups."""
    alive = {id(p) for p in model.parameters()}
    placed: dict[int, int] = {}  # converted parameter -> the group it went to

    def follow(params: Iterable[nn.Parameter], index: int) -> list[nn.Parameter]:
        out = []
        for p in params:
            new = mapping.get(id(p), p)
            for q in new if isinstance(new, list) else [new]:
                if id(q) not in alive or placed.get(id(q)) == index:
                    continue
                if id(q) in placed:
                    raise ValueError(f"parameter groups {placed[id(q)]} and {index} both hold a tensor that one "
                                     f"converted parameter {tuple(q.shape)} is read from: put them in one group")
                placed[id(q)] = index
                out.append(q)
        return out

    items = list(model_parameters)
    if all(isinstance(g, dict) for g in items) and items:
        param_groups = [{**g, "params": follow(g["params"], i)} for i, g in enumerate(items)]
        already_split = any(g.get("moe") for g in param_groups)
        for i, g in enumerate(param_groups):
            g.setdefault("name", f"group{i}")
            if g.get("moe"):
                names = {p.group_name for p in g["params"]}
                if len(names) > 1:
                    raise ValueError(f"parameter group {g['name']!r} mixes expert groups {sorted(names)}")
                if names:
                    g["name"] = names.pop()  # the stock group name (ep_size_S) may differ from ep_size_N
        if already_split:
            return [g for g in param_groups if g["params"] or not g.get("moe")]
    elif any(isinstance(g, dict) for g in items):
        raise ValueError("model_parameters mixes parameter groups (dicts) and bare parameters")
    else:
        param_groups = [{"params": follow(items, 0), "name": "params"}]
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def _check_monitor(section: LargeEPSection) -> None:
    if section.monitor.tensorboard_dir is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401  (optional dependency)
        except ImportError as e:
            raise ValueError(
                f"large_ep.monitor.tensorboard_dir={section.monitor.tensorboard_dir!r} needs the tensorboard "
                "package (pip install tensorboard)"
            ) from e


@torch.no_grad()
def update_large_ep_biases(model: nn.Module) -> int:
    """The balancing-bias update of every large-EP layer of ``model`` (converted stock layers and Hugging Face
    blocks alike), with counts summed over the expert-data-parallel replicas as well, so that every replica of the
    model applies the same bias. Returns the layer count."""
    by_group: dict[str, list[LargeEPMoE]] = {}
    for _, layer in moe_layers(model):
        by_group.setdefault(f"ep_size_{layer.ep_size}", []).append(layer)
    return sum(update_layer_biases(layers, groups._get_expert_data_parallel_group(name))
               for name, layers in by_group.items())


def _with_homes_gathered(model: nn.Module, zero_stage: int, fn: Any) -> Any:
    """``fn(model)`` with the home experts of the layers with clones gathered under ZeRO 3 (their weights are
    partitioned between steps; the clones' refresh reads them whole)."""
    homes = [p for _, layer in moe_layers(model) if layer.clones is not None
             for _, expert in layer.local_experts() for p in expert.parameters()]
    if zero_stage < 3 or not homes:
        return fn(model)
    with deepspeed.zero.GatheredParameters(homes, modifier_rank=None):
        return fn(model)


def rebalance_large_ep(model: nn.Module, zero_stage: int = 0, access: Any = None,
                       dp_group: Any = None) -> list[dict[str, Any]]:
    """``largeep_plugin.rebalance`` of the engine's module (the engine's step calls it): with ``replace_every``,
    home experts moved when due with their state in ``access`` (``training_state.DeepSpeedState``; ``dp_group``:
    DeepSpeed's expert-data-parallel group, so every copy of the EP group moves alike); clones refreshed from the
    new weights, re-planned when due. Returns the moves' and re-plans' records."""
    return _with_homes_gathered(model, zero_stage, lambda m: rebalance(m, access, dp_group))


def _hook_bias_updates(engine: Any, section: LargeEPSection, replicated: bool = False, zero_stage: int = 0) -> None:
    """Run the bias update (and the monitor) after each optimizer step the engine really takes; with replicated
    experts, sum their gradients over their replicas first (``hf_blocks.REPLICA_GROUP_ATTR``), before the engine's
    step reduces them (unmanaged gradient accumulation: the engine reduces in ``step()``).

    ``engine.step`` is wrapped on this engine instance: the engine is built inside ``deepspeed.initialize``, so it
    cannot be subclassed, and an optimizer step hook would fire once per parameter group under ZeRO.
    """
    rank0 = dist.get_rank() == 0
    monitor = LoadMonitor(section.monitor.jsonl_path) if section.monitor.jsonl_path is not None and rank0 else None
    writer = None
    if section.monitor.tensorboard_dir is not None and rank0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(section.monitor.tensorboard_dir)
    engine_step = engine.step
    moves = section.replace_every > 0
    access = DeepSpeedState(engine) if moves else None
    edp_group = groups._get_expert_data_parallel_group(section.group_name) if moves else None

    def step(*args: Any, **kwargs: Any) -> Any:
        before = engine.global_steps
        if replicated:
            reduce_expert_gradients(engine.module.parameters(), group_attr=REPLICA_GROUP_ATTR)
        out = engine_step(*args, **kwargs)
        if engine.global_steps == before or not engine.was_step_applied():
            return out  # a gradient-accumulation micro-step, or a step skipped on overflow
        layers = list(moe_layers(engine.module))
        update_large_ep_biases(engine.module)
        replans = rebalance_large_ep(engine.module, zero_stage, access, edp_group)
        if monitor is not None:
            monitor.log_model(engine.global_steps, layers)
            monitor.log_replans(engine.global_steps, replans)
        if writer is not None:
            for name, layer in layers:
                if layer.last_stats is not None:
                    writer.add_scalar(f"large_ep/{name}/imbalance", layer.last_stats.imbalance, engine.global_steps)
                    writer.add_scalar(f"large_ep/{name}/rank_imbalance", layer.last_stats.rank_imbalance,
                                      engine.global_steps)
                    writer.add_scalar(f"large_ep/{name}/drops", int(layer.last_stats.dropped), engine.global_steps)
            for record in replans:
                name = record["layer"]
                if record.get("kind") == "move":   # a decision about the home experts (layer/moves.py)
                    writer.add_scalar(f"large_ep/{name}/experts_moved", len(record["moved"]), engine.global_steps)
                    continue
                writer.add_scalar(f"large_ep/{name}/predicted_rank_imbalance", record["predicted_rank_imbalance"],
                                  engine.global_steps)
                writer.add_scalar(f"large_ep/{name}/clones_moved", len(record["moved"]), engine.global_steps)
            writer.flush()  # one small write per step; nothing is lost when a run ends without closing it
        return out

    engine.step = step
    engine.large_ep_section = section
