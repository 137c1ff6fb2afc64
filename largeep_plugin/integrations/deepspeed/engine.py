"""DeepSpeed integration: ``initialize``, a drop-in for ``deepspeed.initialize`` driven by the ``"large_ep"`` section.

    from largeep_plugin.integrations.deepspeed.engine import initialize
    engine, optimizer, loader, scheduler = initialize(model=model, model_parameters=params, config="ds.json")

With ``"large_ep": {"enabled": true, "ep_size": 16, ...}`` in the config (see ``integrations/section/config.py``;
``"ep_size": "auto"`` is resolved against the world size and the model's experts, and logged by rank 0) it:
1. initialises DeepSpeed's communication if needed and creates DeepSpeed's expert-parallel groups
   ``ep_size_<N>`` (so the engine and the large-EP layers share one group layout);
2. converts every ``deepspeed.moe.layer.MoE`` of the model into a ``LargeEPDeepSpeedMoE`` keeping its weights
   (gate -> router, expert e -> rank e of its EP group, or where ``placement.topology_file`` plans it:
   ``integrations/deepspeed/placement.py``), see ``integrations/deepspeed/convert.py``;
3. maps ``model_parameters`` (parameters or parameter groups built on the stock model) onto the converted
   parameters and splits them into DeepSpeed's MoE parameter groups (needed by ZeRO stages 1 and 2);
4. calls ``deepspeed.initialize`` and hooks the optimizer so that every optimizer step is followed by the
   balancing-bias update of each layer (and a monitor record, when configured).

Without the section, or with ``"enabled": false``, it calls ``deepspeed.initialize`` with exactly the arguments
it was given: the model stays stock. The section is parsed strictly either way.
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

from largeep_plugin.layer.load_balance import LoadMonitor, apply_bias_updates
from largeep_plugin.layer.moe_layer import moe_layers
from largeep_plugin.placement.plan import Placement
from largeep_plugin.integrations.section.config import (AUTO, SECTION, LargeEPSection, load_ds_config,
                                                        parse_large_ep_section, resolve_ep_size)
from .convert import ExpertConverter, LargeEPDeepSpeedMoE, convert_moe_layers
from .placement import (deepspeed_expert_groups, hook_checkpoint_names, plan_section_placement,
                                  resolve_ranks_per_node)

__all__ = ["initialize", "LargeEPDeepSpeedMoE", "large_ep_section", "update_large_ep_biases"]


def large_ep_section(args: Any = None, config: Any = None) -> LargeEPSection:
    """The parsed ``"large_ep"`` section of the config ``deepspeed.initialize`` would use (``config``, else
    ``args.deepspeed_config``); disabled when there is no config or no section."""
    source = config if config is not None else getattr(args, "deepspeed_config", None)
    if source is None:
        return LargeEPSection()
    return parse_large_ep_section(load_ds_config(source).get(SECTION))


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    *,
    config: Any = None,
    expert_converter: ExpertConverter | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with the large-EP conversion when the config's ``"large_ep"`` section enables it.

    Args:
        args, model, optimizer, model_parameters, config, **kwargs: as for ``deepspeed.initialize``.
        expert_converter: reads experts the default converter cannot (see ``deepspeed_convert.ExpertConverter``).
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
    section = _resolve_section(model, section)
    # Planned before any group or collective, identically on every rank (pure function of the files).
    placement = _section_placement(model, section)
    ranks_per_node = resolve_ranks_per_node(section, placement)
    raw = load_ds_config(config if config is not None else args.deepspeed_config)
    ep_group = ensure_expert_groups(section.ep_size, bool(raw.get("use_data_before_expert_parallel_", False)))
    expert_groups = None if placement is None else deepspeed_expert_groups(placement, ep_group, section.group_name)
    mapping = convert_moe_layers(model, section, ep_group, expert_converter=expert_converter, placement=placement,
                                 ranks_per_node=ranks_per_node, expert_groups=expert_groups)
    if model_parameters is not None:
        model_parameters = _moe_param_groups(model_parameters, mapping, model)
    outputs = deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                   config=config, **kwargs)
    engine = outputs[0]
    _hook_bias_updates(engine, section)
    if placement is not None:
        expert_id = placement.rank_to_expert[groups._get_expert_parallel_rank(section.group_name)]
        hook_checkpoint_names(engine, section.group_name, expert_id)
    engine.large_ep_placement = placement
    return outputs


def _stock_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and not isinstance(m, LargeEPDeepSpeedMoE)]


def _resolve_section(model: nn.Module, section: LargeEPSection) -> LargeEPSection:
    """The section with ``ep_size`` an integer for this world and this model's expert count; an ``"auto"`` is
    logged once, by rank 0, so a run's output says which EP size it got."""
    init_deepspeed_comm()
    world = dist.get_world_size()
    counts = {m.num_experts for m in _stock_layers(model)}
    ep = resolve_ep_size(section, world, counts.pop() if len(counts) == 1 else None)
    if section.ep_size == AUTO and dist.get_rank() == 0:
        print(f"largeep: {SECTION}.ep_size=\"{AUTO}\" -> {ep} (world size {world}, data-parallel copies {world // ep})",
              file=sys.stderr, flush=True)
    return dataclasses.replace(section, ep_size=ep)


def _section_placement(model: nn.Module, section: LargeEPSection) -> Placement | None:
    """The section's placement for the model's stock MoE layers (None without a topology file)."""
    if section.placement.topology_file is None and section.placement.load_file is None:
        return None
    stock = _stock_layers(model)
    if not stock:
        return None  # convert_moe_layers names the problem
    counts = sorted({m.num_experts for m in stock})
    if len(counts) > 1:
        raise NotImplementedError(f"the MoE layers have different expert counts {counts}: one placement cannot "
                                  "serve them all")
    top_k = section.top_k if section.top_k is not None else int(stock[0].deepspeed_moe.gate.k)
    return plan_section_placement(section, counts[0], top_k)


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


def _moe_param_groups(model_parameters: Any, mapping: dict[int, nn.Parameter], model: nn.Module) -> list[dict]:
    """Follow the conversion in the caller's parameters (a list of parameters or of groups), drop parameters the
    model no longer has, and split the expert parameters into DeepSpeed's MoE groups."""
    alive = {id(p) for p in model.parameters()}

    def follow(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in params:
            p = mapping.get(id(p), p)
            if id(p) in alive:
                out.append(p)
        return out

    items = list(model_parameters)
    if all(isinstance(g, dict) for g in items) and items:
        param_groups = [{**g, "params": follow(g["params"])} for g in items]
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
        param_groups = [{"params": follow(items), "name": "params"}]
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
    """The balancing-bias update of every large-EP layer of ``model``, with counts summed over the expert-data-
    parallel replicas as well, so that every replica of the model applies the same bias. Returns the layer count."""
    by_group: dict[str, list[Any]] = {}
    for _, module in model.named_modules():
        if isinstance(module, LargeEPDeepSpeedMoE):
            by_group.setdefault(module.expert_group_name, []).append(module.deepspeed_moe)
    for name, layers in by_group.items():
        apply_bias_updates([layer.router.expert_bias for layer in layers],
                           [layer.tokens_per_expert_since_update for layer in layers],
                           [layer.config.bias_update_rate for layer in layers],
                           groups._get_expert_data_parallel_group(name))
    return sum(len(layers) for layers in by_group.values())


def _hook_bias_updates(engine: Any, section: LargeEPSection) -> None:
    """Run the bias update (and the monitor) after each optimizer step the engine really takes.

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

    def step(*args: Any, **kwargs: Any) -> Any:
        before = engine.global_steps
        out = engine_step(*args, **kwargs)
        if engine.global_steps == before or not engine.was_step_applied():
            return out  # a gradient-accumulation micro-step, or a step skipped on overflow
        layers = list(moe_layers(engine.module))
        if monitor is not None:
            monitor.log_model(engine.global_steps, layers)
        if writer is not None:
            for name, layer in layers:
                if layer.last_stats is not None:
                    writer.add_scalar(f"large_ep/{name}/imbalance", layer.last_stats.imbalance, engine.global_steps)
                    writer.add_scalar(f"large_ep/{name}/drops", int(layer.last_stats.dropped), engine.global_steps)
        update_large_ep_biases(engine.module)
        return out

    engine.step = step
    engine.large_ep_section = section
