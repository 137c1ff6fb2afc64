"""The Megatron-LM route: extra arguments, where the plugin's settings come from, and a GPT builder.

Megatron-LM (``core_r0.16``) builds GPT models through ``model_provider(gpt_builder, ...)`` and accepts an
``extra_args_provider``; ``examples/megatron_lm/pretrain_gpt_largeep.py`` passes

    extra_args_provider=add_large_ep_args
    model_provider=partial(model_provider, large_ep_gpt_builder(gpt_builder))

Arguments added:
    --large-ep                     build the MoE layers as large-EP layers (off: Megatron-LM's own builder runs)
    --large-ep-config PATH         JSON or YAML mapping of plugin-only LargeEPConfig fields
    --large-ep-monitor PATH        per-expert load, JSON lines (one file per pipeline stage)
    --deepspeed_config PATH        a DeepSpeed JSON whose top-level "large_ep" section is read (added only when the
                                   parser does not define it already, as Megatron-DeepSpeed does)

The "large_ep" section: ``enabled`` (bool) plus ``LargeEPConfig`` fields; a misspelt key is an error that lists the
valid ones. Fields Megatron's own arguments define (experts, top-k, ...) may appear only with the same value.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import LargeEPConfig


@dataclass(frozen=True, kw_only=True)
class LargeEPSettings:
    """What the Megatron-LM route decided: on or off, the ``LargeEPConfig`` overrides, the monitor path."""

    enabled: bool
    overrides: Mapping[str, Any] = field(default_factory=dict)
    monitor: str | None = None


def add_large_ep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: add the plugin's arguments and return the parser."""
    group = parser.add_argument_group("large-EP MoE (largeep_plugin)")
    group.add_argument("--large-ep", action="store_true", help="build the MoE layers as large-EP layers")
    group.add_argument("--large-ep-config", default=None, metavar="PATH",
                       help="JSON or YAML mapping of LargeEPConfig fields (bias_update_rate, init_seed, check_inputs)")
    group.add_argument("--large-ep-monitor", default=None, metavar="PATH",
                       help="per-expert load as JSON lines (one file per pipeline stage)")
    if "--deepspeed_config" not in parser._option_string_actions:
        group.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                           metavar="PATH", help="DeepSpeed JSON; its top-level 'large_ep' section is read")
    return parser


_SECTION_KEYS = ["enabled"] + sorted(f for f in LargeEPConfig.__dataclass_fields__)


def _check_section(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping of large_ep settings, got {type(section).__name__}")
    unknown = [k for k in section if k not in _SECTION_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys are {_SECTION_KEYS}")
    if "enabled" in section and not isinstance(section["enabled"], bool):
        raise ValueError(f"{where}: enabled={section['enabled']!r} must be true or false")
    return dict(section)


def read_large_ep_file(path: str) -> dict[str, Any]:
    """A ``--large-ep-config`` file: a JSON (``.json``) or YAML (``.yaml``/``.yml``) mapping."""
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
    return _check_section(data, f"--large-ep-config {path}")


def read_deepspeed_large_ep_section(path: str) -> dict[str, Any] | None:
    """The top-level ``"large_ep"`` section of a DeepSpeed JSON, or None when it has none."""
    if not os.path.isfile(path):
        raise ValueError(f"--deepspeed_config={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, Mapping):
        raise ValueError(f"--deepspeed_config {path}: expected a JSON object")
    if "large_ep" not in data:
        return None
    return _check_section(data["large_ep"], f'the "large_ep" section of {path}')


def large_ep_settings(args: Any) -> LargeEPSettings:
    """Decide from Megatron-LM's parsed arguments whether the layer is on and with which overrides."""
    section = None
    if getattr(args, "deepspeed_config", None):
        section = read_deepspeed_large_ep_section(args.deepspeed_config)
    from_file = read_large_ep_file(args.large_ep_config) if getattr(args, "large_ep_config", None) else None
    if section is not None and from_file is not None:
        raise ValueError(
            f"both --large-ep-config {args.large_ep_config} and the large_ep section of {args.deepspeed_config} give "
            "large-EP settings: give one of them"
        )
    settings = dict(section if section is not None else from_file or {})
    enabled_in_file = settings.pop("enabled", None)
    if enabled_in_file is False and args.large_ep:
        raise ValueError("--large-ep is given but the large_ep settings say enabled=false: remove one of them")
    enabled = bool(args.large_ep or enabled_in_file)
    if not enabled and (settings or getattr(args, "large_ep_monitor", None)):
        raise ValueError(
            "large-EP settings (--large-ep-config, a large_ep section or --large-ep-monitor) are given but the "
            "large-EP layer is off: add --large-ep or enabled=true"
        )
    return LargeEPSettings(enabled=enabled, overrides=settings, monitor=getattr(args, "large_ep_monitor", None))


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

    from .megatron_specs import get_gpt_decoder_block_spec_with_large_ep

    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args  # Megatron-LM

        config = core_transformer_config_from_args(args)
    block = get_gpt_decoder_block_spec_with_large_ep(
        config,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        large_ep=settings.overrides,
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
    """After every optimizer step: the plugin's bias update, then the per-expert load to the monitor and to
    Megatron-LM's TensorBoard writer (on the first rank of each pipeline stage's TP x DP x CP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..load_balance import LoadMonitor
    from .megatron_balance import install_bias_update_hook, log_expert_load

    logs = dist.get_rank(parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)) == 0
    monitor = None
    if logs and settings.monitor:
        path = settings.monitor
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.pp{parallel_state.get_pipeline_model_parallel_rank()}{ext}"
        monitor = LoadMonitor(path)
    step = [0]

    def log() -> None:
        if logs:
            log_expert_load(model, step[0], monitor=monitor, writer=_tensorboard_writer())
        step[0] += 1

    return install_bias_update_hook(model, None, after=log)


def _tensorboard_writer() -> Any:
    try:
        from megatron.training.global_vars import get_tensorboard_writer  # Megatron-LM
    except ImportError:
        return None
    return get_tensorboard_writer()
