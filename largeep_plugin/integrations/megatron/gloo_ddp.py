"""Stand-in for Megatron's ``DistributedDataParallel`` on CPU/gloo: Megatron's allocates its buffers on CUDA.

Data-parallel gradient reduction with Megatron's semantics on plain ``.grad`` tensors: Megatron's DDP allocates
its gradient buffers on ``torch.cuda.current_device()``, so it cannot wrap a model on CPU. ``GlooDataParallel`` is the part of it that ``finalize_model_grads`` uses
(``finish_grad_sync``, ``scale_gradients``, ``ddp_config``, ``module``), reducing like Megatron does:

    non-expert parameters:                  average over DP x CP
    expert parameters (allreduce=False):    sum over expert-DP, then divide by DP x CP
                                            (each expert already received the tokens of its whole EP group)
    replicated experts (EP > experts):      first summed over the expert's replicas inside the EP group
                                            (``replicas.sum_replica_gradients_``): each replica got
                                            part of its tokens

so the example and the tests run Megatron's own ``finalize_model_grads`` (bias update included) on CPU. On GPUs use
Megatron's DDP (and, for replicated experts, ``replicas.enable_replica_gradient_sum``).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig

from largeep_plugin.layer.grads import allreduce_gradients
from .layer import large_ep_moe_layers
from .replicas import attach_replica_groups, sum_replica_gradients_


class GlooDataParallel(nn.Module):
    """Wrap a Megatron model chunk for CPU training with Megatron's ``finalize_model_grads``.

    Args:
        config: the model's ``TransformerConfig``.
        module: the model chunk (e.g. a ``GPTModel``).
        dp_cp_group / expt_dp_group: None = ``parallel_state``'s data-parallel (with CP) and expert-DP groups.
    """

    def __init__(self, config: Any, module: nn.Module, *, dp_cp_group: Any = None, expt_dp_group: Any = None):
        super().__init__()
        self.config = config
        self.module = module
        self.ddp_config = DistributedDataParallelConfig()
        self.dp_cp_group = dp_cp_group or parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.expt_dp_group = expt_dp_group or parallel_state.get_expert_data_parallel_group()
        attach_replica_groups(module)
        for _, layer in large_ep_moe_layers(module):
            layer.replica_grads_summed = True  # finish_grad_sync sums replicated experts' gradients

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Reduce the gradients (called by ``finalize_model_grads``): replicas first, then data parallel."""
        sum_replica_gradients_(self.module)
        self.reduce_data_parallel()

    def reduce_data_parallel(self) -> None:
        """Megatron DDP's reduction alone (no replica sum): non-expert gradients averaged over DP x CP, expert
        gradients summed over expert-DP and divided by DP x CP."""
        allreduce_gradients(self.module, group=self.dp_cp_group, average=True, expert_group=self.expt_dp_group)

    def scale_gradients(self, scaling_factor: float) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scaling_factor)

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def sharded_state_dict(self, prefix: str = "", *args: Any, **kwargs: Any) -> Any:
        return self.module.sharded_state_dict(prefix, *args, **kwargs)
