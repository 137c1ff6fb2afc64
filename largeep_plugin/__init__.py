"""largeep_plugin: Mixture-of-Experts layers with large expert parallelism, for Megatron-Core, DeepSpeed and
plain PyTorch.

    import largeep_plugin as lep
    moe = lep.LargeEPMoE(lep.LargeEPConfig(hidden_size=1024, ffn_hidden_size=4096, num_experts=16, top_k=2))
    placement = lep.plan_placement(16, lep.load_topology("2x8_h100.yaml"), load=tokens_per_expert)

The package, floor by floor (nothing imports upwards):
    placement/      where experts live: topology, planner, traffic model (torch + stdlib, no torch.distributed)
    layer/          the MoE layer and its parallel wiring (torch + stdlib; imports placement/)
    tools/, cluster/    launcher, progress bar, charts, benchmarks, load recording; emulated multi-node cluster
    models/, perfmodel/ the demo's small MoE transformer; the performance model
    integrations/   the only code that imports a framework: megatron/, deepspeed/, section/ (the JSON section)
    commands/, cli.py   the ``largeep`` command

Importing this package imports torch and the standard library only (no Megatron, DeepSpeed, yaml or matplotlib):
the frameworks come in through ``largeep_plugin.megatron`` and ``largeep_plugin.deepspeed`` on first use.
"""
from largeep_plugin.layer.clip import clip_grad_norm_, grad_norm
from largeep_plugin.layer.comm import end_process
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.load_balance import LoadMonitor
from largeep_plugin.layer.moe_layer import (LargeEPMoE, load_stats, rebalance, refresh_clones, set_aux_loss_scale,
                                            update_expert_biases)
from largeep_plugin.layer.moves import move_experts
from largeep_plugin.layer.training_state import load_training_state, save_training_state
from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.placement.topology import Topology, load_topology

__version__ = "0.1.0"

__all__ = [
    "LargeEPConfig",
    "LargeEPMoE",
    "LoadMonitor",
    "Placement",
    "Topology",
    "allreduce_gradients",
    "clip_grad_norm_",
    "end_process",
    "grad_norm",
    "load_stats",
    "load_topology",
    "load_training_state",
    "move_experts",
    "plan_placement",
    "rebalance",
    "refresh_clones",
    "save_training_state",
    "set_aux_loss_scale",
    "update_expert_biases",
]
