"""Megatron-Core integration of the large-EP MoE layer (megatron-core 0.16).

    from largeep_plugin.adapters.megatron import get_gpt_decoder_block_spec_with_large_ep
    block = get_gpt_decoder_block_spec_with_large_ep(config, large_ep={"bias_update_rate": 1e-3})
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=..., max_sequence_length=...)

What lives where:
    megatron_config.py      TransformerConfig -> LargeEPConfig, once, with clear errors
    megatron_router.py      LargeEPRouter: the core router behind Megatron's router interface
    megatron_dispatcher.py  LargeEPTokenDispatcher: the six-stage MoETokenDispatcher over the core all-to-all
    megatron_layer.py       LargeEPMoELayer (MoELayer subclass), LargeEPExperts
    megatron_checkpoint.py  experts saved under their global expert id in the distributed checkpoint
    megatron_specs.py       spec helpers: stock GPT specs with the MoE mlp swapped
    megatron_attention.py   TorchSDPAttention: a core attention that runs on CPU
    megatron_balance.py     bias update (finalize_model_grads for sigmoid, the plugin's hook otherwise), load logging
    megatron_cpu.py         GlooDataParallel: Megatron's gradient reduction on CPU (its DDP needs CUDA)
    megatron_replicas.py    replicated experts: their gradients summed over the replicas (Megatron's DDP or CPU)
    megatron_lm.py          the Megatron-LM route: extra arguments, the large_ep section of a DeepSpeed JSON
"""
from .megatron_attention import TorchSDPAttention
from .megatron_balance import install_bias_update_hook, log_expert_load, update_large_ep_biases
from .megatron_checkpoint import expert_sharded_state_dict
from .megatron_config import check_megatron_config, large_ep_config_from_megatron
from .megatron_cpu import GlooDataParallel
from .megatron_dispatcher import LargeEPTokenDispatcher
from .megatron_layer import LargeEPExperts, LargeEPMoELayer, large_ep_moe_layers
from .megatron_replicas import enable_replica_gradient_sum, sum_replica_gradients_
from .megatron_router import LargeEPRouter
from .megatron_specs import (
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
