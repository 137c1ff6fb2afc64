"""Megatron-Core integration of the large-EP MoE layer (megatron-core 0.16).

    from largeep_plugin.integrations.megatron import get_gpt_decoder_block_spec_with_large_ep
    block = get_gpt_decoder_block_spec_with_large_ep(config, large_ep={"bias_update_rate": 1e-3})
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=..., max_sequence_length=...)

What lives where:
    config.py         TransformerConfig -> LargeEPConfig, once, with clear errors
    router.py         LargeEPRouter: the core router behind Megatron's router interface
    dispatcher.py     LargeEPTokenDispatcher: the six-stage MoETokenDispatcher over the core all-to-all
    layer.py          LargeEPMoELayer (MoELayer subclass): the stages, placements, clones, moves of home experts
    experts.py        LargeEPExperts: this rank's expert(s) and their checkpoint layout
    checkpoint.py     experts saved under their global expert id in the distributed checkpoint
    specs.py          spec helpers: stock GPT specs with the MoE mlp swapped
    cpu_attention.py  TorchSDPAttention: a core attention that runs on CPU
    balance.py        bias update (finalize_model_grads for sigmoid, the plugin's hook otherwise), load logging
    gloo_ddp.py       GlooDataParallel: Megatron's gradient reduction on CPU (its DDP needs CUDA)
    optimizer_state.py  MegatronOptimizerState: the optimizer's per-parameter state, for moves of home experts
    replicas.py       replicated experts: their gradients summed over the replicas (Megatron's DDP or CPU)
    lm.py             the Megatron-LM route: extra arguments, the large_ep section of a DeepSpeed JSON
"""
from .cpu_attention import TorchSDPAttention
from .balance import install_bias_update_hook, log_expert_load, update_large_ep_biases
from .checkpoint import expert_sharded_state_dict
from .config import check_megatron_config, large_ep_config_from_megatron
from .gloo_ddp import GlooDataParallel
from .dispatcher import LargeEPTokenDispatcher
from .experts import LargeEPExperts
from .layer import LargeEPMoELayer, large_ep_moe_layers
from .optimizer_state import MegatronOptimizerState
from .replicas import enable_replica_gradient_sum, sum_replica_gradients_
from .router import LargeEPRouter
from .specs import (
    get_gpt_decoder_block_spec_with_large_ep,
    get_gpt_layer_spec_with_large_ep,
    large_ep_mlp_spec,
    with_large_ep,
)

__all__ = [
    "GlooDataParallel",
    "sum_replica_gradients_",
    "LargeEPExperts",
    "LargeEPMoELayer",
    "LargeEPRouter",
    "LargeEPTokenDispatcher",
    "MegatronOptimizerState",
    "TorchSDPAttention",
    "check_megatron_config",
    "enable_replica_gradient_sum",
    "expert_sharded_state_dict",
    "get_gpt_decoder_block_spec_with_large_ep",
    "get_gpt_layer_spec_with_large_ep",
    "install_bias_update_hook",
    "large_ep_config_from_megatron",
    "large_ep_mlp_spec",
    "large_ep_moe_layers",
    "log_expert_load",
    "update_large_ep_biases",
    "with_large_ep",
]
