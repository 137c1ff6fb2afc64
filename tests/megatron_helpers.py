"""Helpers of the Megatron-Core tests (tests/test_megatron_*.py); they run inside a rank of a gloo world.

Megatron on CPU: ``use_cpu_initialization=True``, the plugin's ``TorchSDPAttention`` instead of Megatron's local
attention (which allocates on CUDA), ``GlooDataParallel`` instead of Megatron's DDP, and a minimal
distributed-checkpoint strategy under Megatron's own ``dist_checkpointing.save`` / ``load`` (``dist_save`` /
``dist_load``; see tests/test_megatron_checkpoint.py).
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

# Megatron warns at import time about missing Transformer Engine / Apex, and TransformerLayer warns that it does
# not know the large-EP mlp class (it then passes no pg_collection, as designed).
warnings.filterwarnings(
    "ignore", message=".*(Transformer Engine|Apex|Unknown MLP type|path_to_cache|full scope is deprecated).*"
)

HIDDEN = 12
FFN = 16
HEADS = 2


def init_megatron(tp: int = 1, ep: int = 1, pp: int = 1, etp: int = 1) -> None:
    """``parallel_state`` for this world (expert TP ``etp``); destroys a previous initialisation first."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, create_gloo_process_groups=False,
    )


def tiny_config(**overrides: Any) -> Any:
    """A small CPU ``TransformerConfig`` with MoE; ``overrides`` are TransformerConfig fields."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: dict[str, Any] = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=ps.get_expert_model_parallel_world_size(), moe_router_topk=2,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        init_method_std=0.4,  # O(1) outputs and well separated router scores: tight comparisons mean something
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def tiny_gpt(
    config: Any, *, seed: int = 0, vocab: int = 32, seq: int = 8, large_ep: Any = None, placement: Any = None
) -> Any:
    """A ``GPTModel`` with large-EP MoE layers (this pipeline stage's layers), built from ``seed``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from largeep_plugin.integrations.megatron import TorchSDPAttention, get_gpt_decoder_block_spec_with_large_ep

    block = get_gpt_decoder_block_spec_with_large_ep(
        config, core_attention=TorchSDPAttention, large_ep=large_ep, placement=placement
    )
    torch.manual_seed(seed)
    return GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=vocab, max_sequence_length=seq,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )


def layer_and_reference(spec: Any, config: Any, reference_mlp: type) -> tuple[Any, Any]:
    """A ``TransformerLayer`` built from ``spec`` and the same layer with ``reference_mlp`` as its mlp, sharing
    every weight outside the mlp."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    torch.manual_seed(0)
    layer = build_module(spec, config=config, layer_number=1)
    ref_spec = dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, mlp=ModuleSpec(module=reference_mlp))
    )
    ref = build_module(ref_spec, config=config, layer_number=1)
    dense = {k: v for k, v in layer.state_dict().items() if not k.startswith("mlp.")}
    missing, unexpected = ref.load_state_dict(dense, strict=False)
    assert not unexpected and all(k.startswith("mlp.") for k in missing), (missing, unexpected)
    return layer, ref


def compare_transformer_layers(layer: Any, ref: Any, hidden: int, rank: int) -> tuple[dict[str, float], torch.Tensor]:
    """Forward and backward of two ``TransformerLayer``s on this rank's own tokens [5, 2, H] (loss sum(y * g)).

    Returns:
        errors: relative errors of the output, the input gradient and the gradient of every parameter outside
            the mlp (attention, norms), by name.
        y_ref: the reference's output.
    """
    from conftest import rel_err

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(5, 2, hidden, generator=gen)
    g = torch.randn(5, 2, hidden, generator=gen)
    outs = {}
    for name, model in (("ep", layer), ("ref", ref)):
        xi = x.clone().requires_grad_(True)
        y, _ = model(xi)
        (y * g).sum().backward()
        outs[name] = (y.detach(), xi.grad)
    errors = {"y": rel_err(outs["ep"][0], outs["ref"][0]), "dx": rel_err(outs["ep"][1], outs["ref"][1])}
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        if not name.startswith("mlp."):
            errors[name] = rel_err(p.grad, ref_params[name].grad)
    return errors, outs["ref"][0]


def error_of(fn: Any) -> str:
    """``"<ErrorType>: <message>"`` of the ValueError or NotImplementedError ``fn()`` raises, "no error" otherwise."""
    try:
        fn()
    except (ValueError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def tokens(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, S], position ids [B, S]) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return ids, torch.arange(seq).expand(batch, seq)


class Replicated:
    """A placement (the ``PlacementLike`` protocol of ``moe_layer.py``): EP rank r holds expert r % E, and a token
    goes to the copy in its own block of E ranks."""

    def __init__(self, num_experts: int, ep_size: int):
        self.num_experts = num_experts
        self.rank_to_expert = [r % num_experts for r in range(ep_size)]

    def destination_ranks(self, topk_ids_TK: torch.Tensor, src_rank: int) -> torch.Tensor:
        return topk_ids_TK + self.num_experts * (src_rank // self.num_experts)


def placement_for(experts: int, ep: int) -> Any:
    """None (expert e on EP rank e), replicas (EP > experts) or consecutive experts colocated (EP < experts)."""
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Topology

    if ep > experts:
        return Replicated(experts, ep)
    if ep < experts:
        per_rank = experts // ep
        held = tuple(tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep))
        return Placement(topology=Topology.uniform(1, ep), num_experts=experts, rank_to_experts=held)
    return None


def colocated_placement(experts: int, ep: int) -> Any:
    """Consecutive experts colocated on ``ep`` ranks, as evenly as they go (the first ``experts % ep`` ranks hold
    one more): 8 experts on 6 ranks are (0, 1) (2, 3) (4,) (5,) (6,) (7,)."""
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Topology

    per, extra = divmod(experts, ep)
    held, start = [], 0
    for r in range(ep):
        n = per + (1 if r < extra else 0)
        held.append(tuple(range(start, start + n)))
        start += n
    return Placement(topology=Topology.uniform(1, ep), num_experts=experts, rank_to_experts=tuple(held))


def megatron_adam(model: Any, lr: float) -> Any:
    """Megatron's optimizer for an fp32 model, as ``get_megatron_optimizer`` builds it without the distributed
    optimizer: Megatron's parameter groups (``_get_param_groups``: dense, and expert-parallel for
    ``allreduce=False``), one torch Adam (the fallback without Apex/TE) and one ``FP32Optimizer`` each, chained.

    On CPU: ``FP32Optimizer.__init__`` puts its unit loss scale on CUDA, so each is made without its ``__init__``
    (the base class's, then the scale on CPU); its ``sharded_state_dict`` / ``load_state_dict`` are Megatron's.
    ``ChainedOptimizer.step`` takes the gradient norm on CUDA: step ``chained_optimizers`` one by one
    (``megatron_step``), as ``ChainedOptimizer.step_with_ready_grads`` does."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer, MegatronOptimizer

    config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=0.0)
    groups = _get_param_groups([model], config, None)

    def init_state_fn(opt: Any, config: Any = None) -> None:  # Megatron's, for torch Adam
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)

    chained = []
    for expert in (False, True):
        adam = torch.optim.AdamW([g for g in groups if g["is_expert_parallel"] == expert], lr=lr,
                                 weight_decay=0.0, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
        opt = FP32Optimizer.__new__(FP32Optimizer)
        MegatronOptimizer.__init__(opt, adam, config, init_state_fn)
        opt._scale, opt.is_stub_optimizer = torch.ones(1), False
        chained.append(opt)
    return ChainedOptimizer(chained)


def megatron_step(optimizer: Any) -> None:
    """``ChainedOptimizer.step`` without its gradient norm (CUDA-only; clip_grad is 0): each part steps."""
    for opt in optimizer.chained_optimizers:
        opt.step()


def files_strategy() -> Any:
    """The bytes of Megatron's distributed checkpoint on CPU: ``dist_checkpointing.save`` / ``load`` with this
    sharded strategy run Megatron's whole pipeline (factories, common state on rank 0, sharded objects, the
    integrity validation, merges); only the tensor files are these: every rank writes the main replicas of its
    ``ShardedTensor`` s by (key, global offset), a load fills each requested shard from them. (The stock torch_dist
    strategy calls ``torch.cuda`` on save.)"""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica
    from megatron.core.dist_checkpointing.strategies.base import (
        LoadShardedStrategy, SaveShardedStrategy, StrategyAction, register_default_strategy,
    )

    backend = "largeep_test_files"

    class Files(SaveShardedStrategy, LoadShardedStrategy):
        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            mine = []
            for sh in nested_values(sharded_state_dict):
                if sh.flattened_range is not None:
                    raise NotImplementedError(f"{sh.key}: flattened shards are not stored by this strategy")
                if is_main_replica(sh.replica_id):
                    mine.append((sh.key, tuple(sh.global_offset), sh.data.detach().clone()))
            torch.save(mine, os.path.join(checkpoint_dir, f"shards{dist.get_rank()}.pt"))

        def load(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
            stored = {}
            for path in glob.glob(os.path.join(checkpoint_dir, "shards*.pt")):
                for key, offset, data in torch.load(path, weights_only=True):
                    stored[(key, offset)] = data

            def fill(sh: Any) -> torch.Tensor:
                data = stored[(sh.key, tuple(sh.global_offset))]
                if tuple(data.shape) != tuple(sh.local_shape):
                    raise AssertionError(f"{sh.key} at {sh.global_offset}: stored {tuple(data.shape)}, "
                                         f"asked {tuple(sh.local_shape)}")
                return data

            return dict_list_map_inplace(fill, sharded_state_dict)

        def load_tensors_metadata(self, checkpoint_dir: Any) -> Any:
            raise NotImplementedError("the test strategy keeps no tensor metadata (strict loads do not need it)")

        def check_backend_compatibility(self, loaded_backend: Any) -> None:
            if loaded_backend != backend:
                raise ValueError(f"checkpoint backend {loaded_backend!r}, this strategy reads {backend!r}")

        def check_version_compatibility(self, loaded_version: Any) -> None:
            pass

    files = Files(backend, 1)
    # What Megatron looks up for a checkpoint of this backend when no strategy is given (load_content_metadata).
    register_default_strategy(StrategyAction.LOAD_SHARDED, backend, 1, files)
    return files


def dist_save(sharded: dict[str, Any], directory: str, content_metadata: dict | None = None) -> None:
    """``megatron.core.dist_checkpointing.save`` on CPU (``files_strategy``)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded, directory, sharded_strategy=files_strategy(), content_metadata=content_metadata)


def dist_load(sharded: dict[str, Any], directory: str) -> dict[str, Any]:
    """``megatron.core.dist_checkpointing.load`` on CPU (``files_strategy``)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded, directory, sharded_strategy=files_strategy())
