"""The Megatron-LM route: extra arguments, where the plugin's settings come from, and a GPT builder.

Megatron-LM (``core_r0.16``) builds GPT models through ``model_provider(gpt_builder, ...)`` and accepts an
``extra_args_provider``; ``examples/megatron_lm/pretrain_gpt_largeep.py`` passes

    extra_args_provider=add_large_ep_args
    model_provider=partial(model_provider, large_ep_gpt_builder(gpt_builder))

Arguments added:
    --large-ep                     build the MoE layers as large-EP layers (off: Megatron-LM's own builder runs)
    --large-ep-config PATH         JSON or YAML file holding a "large_ep" section (bare, or under a "large_ep" key)
    --large-ep-monitor PATH        per-expert load, JSON lines (one file per pipeline stage)
    --deepspeed_config PATH        a DeepSpeed JSON whose top-level "large_ep" section is read (added only when the
                                   parser does not define it already, as Megatron-DeepSpeed does)

The "large_ep" section is the one DeepSpeed users write (``integrations/section/config.py``, parsed strictly by the
same code). In Megatron, the model's shape comes from Megatron's arguments: ``ep_size``, ``top_k``,
``score_function``, ``capacity_factor`` and the loss coefficients may appear only with the values Megatron's
arguments give (``"ep_size": "auto"`` takes ``--expert-model-parallel-size``; ``data_parallel_copies`` is refused:
Megatron derives the data-parallel size from the world and its parallel sizes); what the section adds is
``enabled``, ``load_balance.bias_update_rate``, ``overlap``, ``monitor`` and ``placement``.

``placement.topology_file`` (the topology of one EP group: EP rank r is its r-th GPU, counted node by node) and
optionally ``placement.load_file`` (tokens per expert) give a topology-aware permutation of the experts over the
EP ranks: planned once per process from ``--num-experts``, ``--moe-router-topk`` and
``--expert-model-parallel-size`` by the section's planner (``integrations/section/placement.py``,
``plan_section_placement``: pure, so every rank plans the same without communicating; it imports no framework), carried in ``LargeEPSettings.placement`` and given to
every large-EP layer through the layer spec. Every EP group uses the same permutation, so Megatron's
expert-data-parallel gradient reduction (the same EP rank in every copy) still joins copies of one expert, and the
distributed checkpoint keys experts by global expert id. Refused: a topology whose GPU count is not the EP size
(``ValueError``), and experts != EP size (replicas, whose gradients Megatron's DDP does not sum over the replica
group; or several experts per GPU), both ``NotImplementedError``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import load_topology
from largeep_plugin.integrations.section.config import (AUTO, SECTION, LargeEPSection, PlacementSection, layer_fields,
                                                        load_ds_config, parse_large_ep_section)
from largeep_plugin.integrations.section.placement import plan_section_placement


@dataclass(frozen=True, kw_only=True)
class LargeEPSettings:
    """What the Megatron-LM route decided: on or off, the ``LargeEPConfig`` overrides, the EP size the section
    asks for, the placement planned from the section's files (None: expert e on EP rank e), and where the
    per-expert load goes."""

    enabled: bool
    overrides: Mapping[str, Any] = field(default_factory=dict)
    ep_size: int | None = None
    placement: Placement | None = None
    monitor: str | None = None
    tensorboard_dir: str | None = None


def add_large_ep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: add the plugin's arguments and return the parser."""
    group = parser.add_argument_group("large-EP MoE (largeep_plugin)")
    group.add_argument("--large-ep", action="store_true", help="build the MoE layers as large-EP layers")
    group.add_argument("--large-ep-config", default=None, metavar="PATH",
                       help='JSON or YAML file with a "large_ep" section (the DeepSpeed JSON format)')
    group.add_argument("--large-ep-monitor", default=None, metavar="PATH",
                       help="per-expert load as JSON lines (one file per pipeline stage)")
    if "--deepspeed_config" not in parser._option_string_actions:
        group.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                           metavar="PATH", help="DeepSpeed JSON; its top-level 'large_ep' section is read")
    return parser


def read_large_ep_file(path: str) -> dict[str, Any]:
    """The raw section of a ``--large-ep-config`` file: JSON, or YAML (``.yaml``/``.yml``); the file holds the
    section itself or a mapping with a ``"large_ep"`` key."""
    if not os.path.isfile(path):
        raise ValueError(f"--large-ep-config={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as e:  # pragma: no cover - pyyaml is a dependency of the package
                raise ImportError("reading a YAML --large-ep-config needs pyyaml (pip install pyyaml)") from e
            data = yaml.safe_load(f)
        else:
            data = json.load(f)
    if isinstance(data, Mapping) and "large_ep" in data:
        data = data["large_ep"]
    if not isinstance(data, Mapping):
        raise ValueError(f"--large-ep-config {path} must hold a mapping (the large_ep section)")
    return dict(data)


def read_deepspeed_large_ep_section(path: str) -> dict[str, Any] | None:
    """The raw top-level ``"large_ep"`` section of a DeepSpeed JSON, or None when it has none."""
    if not os.path.isfile(path):
        raise ValueError(f"--deepspeed_config={path!r}: no such file")
    section = load_ds_config(path).get("large_ep")
    return None if section is None else section


def overrides_from_section(raw: Mapping[str, Any], section: LargeEPSection) -> dict[str, Any]:
    """``LargeEPConfig`` overrides from a parsed section; only the keys the user wrote (``raw``) count, so a
    default of the section never contradicts Megatron's arguments. (The placement files give
    ``LargeEPSettings.placement``, see ``plan_megatron_placement``.)"""
    return layer_fields(section, written=raw)


def large_ep_settings(args: Any) -> LargeEPSettings:
    """Decide from Megatron-LM's parsed arguments whether the layer is on and with which settings."""
    raw = None
    if getattr(args, "deepspeed_config", None):
        raw = read_deepspeed_large_ep_section(args.deepspeed_config)
    if getattr(args, "large_ep_config", None):
        if raw is not None:
            raise ValueError(
                f"both --large-ep-config {args.large_ep_config} and the large_ep section of {args.deepspeed_config} "
                "give large-EP settings: give one of them"
            )
        raw = read_large_ep_file(args.large_ep_config)
    section = parse_large_ep_section(raw)  # strict: misspelt keys, wrong types, impossible values
    if section.data_parallel_copies is not None:
        raise ValueError(f"{SECTION}.data_parallel_copies={section.data_parallel_copies}: under Megatron-LM the "
                         "data-parallel size follows from the world size and Megatron's parallel sizes; remove it")
    if section.allow_colocate:
        raise ValueError(f"{SECTION}.allow_colocate=true is for Hugging Face models under DeepSpeed; under "
                         "Megatron-LM experts per rank follow --num-experts and --expert-model-parallel-size: remove it")
    if section.replace_every != 0:
        raise NotImplementedError(
            f"{SECTION}.replace_every={section.replace_every}: moving home experts is not supported on the "
            "Megatron-LM route, which reads this section too (its training loop does not hand the plugin's hook the "
            "optimizer; Megatron-Core training loops can: large_ep={'replace_every': N} in the spec helpers and "
            "install_bias_update_hook(model, optimizer)); set it to 0")
    raw = dict(raw or {})
    if args.large_ep and raw.get("enabled") is False:
        raise ValueError("--large-ep is given but the large_ep section says enabled=false: remove one of them")
    enabled = bool(args.large_ep or section.enabled)
    monitor = getattr(args, "large_ep_monitor", None)
    if monitor and section.monitor.jsonl_path and monitor != section.monitor.jsonl_path:
        raise ValueError(
            f"--large-ep-monitor {monitor} and large_ep.monitor.jsonl_path {section.monitor.jsonl_path} differ: "
            "give one of them"
        )
    if not enabled and (len(raw) > ("enabled" in raw) or monitor):
        raise ValueError(
            "large-EP settings (--large-ep-config, a large_ep section or --large-ep-monitor) are given but the "
            "large-EP layer is off: add --large-ep or \"enabled\": true"
        )
    placement = None
    if enabled and (section.placement.topology_file is not None or section.placement.load_file is not None):
        placement = plan_megatron_placement(
            section.placement, num_experts=getattr(args, "num_experts", None), top_k=args.moe_router_topk,
            ep_size=args.expert_model_parallel_size,
        )
    return LargeEPSettings(
        enabled=enabled,
        overrides=overrides_from_section(raw, section),
        ep_size=None if section.ep_size == AUTO else section.ep_size,  # "auto": Megatron's EP size
        placement=placement,
        monitor=monitor or section.monitor.jsonl_path,
        tensorboard_dir=section.monitor.tensorboard_dir,
    )


@functools.lru_cache(maxsize=None)
def plan_megatron_placement(files: PlacementSection, *, num_experts: int | None, top_k: int,
                            ep_size: int) -> Placement | None:
    """The placement of ``large_ep.placement`` for Megatron-LM's ``--num-experts``, ``--moe-router-topk`` and
    ``--expert-model-parallel-size``: the section's ``plan_section_placement`` after the checks that
    Megatron needs (the topology is one EP group, one expert per EP rank). Deterministic and cached by these
    arguments: planned once per process (files are read on the first call only), the same on every rank."""
    where = f"{SECTION}.placement.topology_file={files.topology_file!r}"
    if files.topology_file is not None:
        if not num_experts:
            raise ValueError(f"{where} places the experts of the MoE layers but --num-experts is not set")
        try:
            w = load_topology(files.topology_file).world_size
        except (OSError, ValueError) as e:
            raise ValueError(f"{where} cannot be read: {e}") from e
        if w != ep_size:
            raise ValueError(f"{where} describes {w} GPUs but --expert-model-parallel-size is {ep_size}: the "
                             "topology is that of one expert-parallel group (EP rank r is its r-th GPU)")
        if num_experts < w:
            raise NotImplementedError(
                f"{where} describes {w} GPUs for --num-experts {num_experts}, which replicates experts: the replicas "
                "of an expert would have to sum their gradients over their replica group, which Megatron's DDP "
                "does not do. Give --num-experts equal to --expert-model-parallel-size"
            )
        if num_experts > w:
            raise NotImplementedError(
                f"{where} describes {w} GPUs for --num-experts {num_experts}: several experts per GPU are not "
                "planned from placement files. Give --num-experts equal to --expert-model-parallel-size"
            )
    # The section as plan_section_placement reads it: the files, and EP = Megatron's EP size. Without a topology
    # file it raises (a load file needs one) before num_experts is used.
    return plan_section_placement(LargeEPSection(ep_size=ep_size, placement=files), num_experts or 0, top_k)


_UNSUPPORTED_ARGS = (
    ("use_legacy_models", "the legacy GPT model has no ModuleSpec to put the layer in"),
    ("spec", "--spec replaces the whole layer spec; the large-EP builder makes its own"),
    ("mtp_num_layers", "multi-token prediction layers are not built with large-EP"),
    ("experimental_attention_variant", "experimental attention variants are not combined with large-EP"),
    ("heterogeneous_layers_config_path", "heterogeneous layers are not combined with large-EP"),
)


def large_ep_gpt_builder(stock_builder: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap Megatron-LM's ``gpt_builder``: with ``--large-ep`` build the GPT model with large-EP MoE layers (and
    install the bias-update and load-logging hook), otherwise call ``stock_builder`` unchanged."""

    def builder(args: Any, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                config: Any = None, pg_collection: Any = None) -> Any:
        settings = large_ep_settings(args)
        if not settings.enabled:
            return stock_builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)
        for name, why in _UNSUPPORTED_ARGS:
            if getattr(args, name, None):
                raise NotImplementedError(f"--{name.replace('_', '-')}={getattr(args, name)!r} with --large-ep: {why}")
        if not getattr(args, "num_experts", None):
            raise ValueError("--large-ep needs --num-experts (the large-EP layer is an MoE layer)")
        model = _build_gpt(args, settings, pre_process, post_process, vp_stage, config, pg_collection)
        _install_hooks(model, settings)
        return model

    return builder


def _build_gpt(args: Any, settings: LargeEPSettings, pre_process: bool, post_process: bool, vp_stage: int | None,
               config: Any, pg_collection: Any) -> Any:
    from megatron.core.models.gpt import GPTModel

    from .specs import get_gpt_decoder_block_spec_with_large_ep

    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args  # Megatron-LM

        config = core_transformer_config_from_args(args)
    if settings.ep_size is not None and settings.ep_size != config.expert_model_parallel_size:
        raise ValueError(
            f"large_ep.ep_size={settings.ep_size} contradicts --expert-model-parallel-size "
            f"{config.expert_model_parallel_size}: set it in Megatron's arguments"
        )
    placement = settings.placement
    if placement is not None and (placement.num_experts, placement.world_size) != (
            config.num_moe_experts, config.expert_model_parallel_size):
        raise ValueError(
            f"the large_ep.placement plan is for {placement.num_experts} experts on {placement.world_size} EP ranks "
            f"but the Megatron config has num_moe_experts={config.num_moe_experts}, expert_model_parallel_size="
            f"{config.expert_model_parallel_size}: plan it from the same arguments"
        )
    block = get_gpt_decoder_block_spec_with_large_ep(
        config,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        large_ep=settings.overrides,
        placement=placement,
        normalization=args.normalization,
        qk_l2_norm=args.qk_l2_norm,
        vp_stage=vp_stage,
    )
    # The same GPTModel arguments as Megatron-LM's gpt_builder (core_r0.16).
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def _install_hooks(model: Any, settings: LargeEPSettings) -> Any:
    """After every optimizer step: the plugin's bias update, then the per-expert load (global over each EP group,
    so one rank per pipeline stage suffices) to the monitor and to the section's TensorBoard directory from the
    first rank of each stage's TP x DP x CP group, and to Megatron-LM's own writer from the rank that has it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from largeep_plugin.layer.load_balance import LoadMonitor
    from .balance import install_bias_update_hook, log_expert_load

    logs = dist.get_rank(parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)) == 0
    monitor = writer = None
    stage = ""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stage = f"pp{parallel_state.get_pipeline_model_parallel_rank()}"
    if logs and settings.monitor:
        root, ext = os.path.splitext(settings.monitor)
        monitor = LoadMonitor(f"{root}.{stage}{ext}" if stage else settings.monitor)
    if logs and settings.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(os.path.join(settings.tensorboard_dir, stage))
    step = [0]

    def log() -> None:
        # Megatron-LM keeps its writer on the last rank only: that rank logs its stage's layers there.
        tensorboard = writer if writer is not None else _megatron_lm_writer()
        if monitor is not None or tensorboard is not None:
            log_expert_load(model, step[0], monitor=monitor, writer=tensorboard)
        step[0] += 1

    return install_bias_update_hook(model, None, after=log)


def _megatron_lm_writer() -> Any:
    try:
        from megatron.training.global_vars import get_tensorboard_writer  # Megatron-LM
    except ImportError:
        return None
    return get_tensorboard_writer()
