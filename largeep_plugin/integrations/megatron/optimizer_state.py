"""The training state Megatron's optimizers keep per parameter, as the plugin's ``StateAccess`` (what a move of
home experts reads and writes: ``layer/expert_state.py``, ``layer/moves.py``).

``get_megatron_optimizer`` gives a ``ChainedOptimizer`` of one optimizer for the dense and one for the
expert-parallel parameters. Each part is, by its config:

    FP32Optimizer                      (fp32, no distributed optimizer) a torch optimizer stepping the model's own
                                       parameters: the state is ``optimizer.state[param]`` (Adam's ``exp_avg``,
                                       ``exp_avg_sq``, ``step``), read and written as the core's
                                       ``TorchOptimizerState`` does
    Float16OptimizerWithFloat16Params  (bf16/fp16) fp32 main copies in ``fp32_from_float16_groups``, the torch
                                       state keyed by them: refused (NotImplementedError)
    DistributedOptimizer               the main copies and moments of this data-parallel rank's range of flat
                                       buffers: refused (NotImplementedError)

The two refused kinds allocate on CUDA when built, so no CPU test here can check a move of their state; they are
refused by name rather than moved unchecked.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

from largeep_plugin.layer.expert_state import State, TorchOptimizerState


def optimizer_parts(optimizer: Any) -> list[Any]:
    """The optimizers of a Megatron optimizer (a ``ChainedOptimizer``'s parts, or itself)."""
    parts = getattr(optimizer, "chained_optimizers", None)
    return list(parts) if parts is not None else [optimizer]


class MegatronOptimizerState:
    """``StateAccess`` over a Megatron optimizer (``FP32Optimizer`` parts, chained or not; see the module
    docstring), or a plain torch optimizer.

    Args:
        optimizer: what ``get_megatron_optimizer`` returned (or a torch optimizer).
    Raises:
        NotImplementedError: a part keeps fp32 main copies (mixed precision, the distributed optimizer).
    """

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self._of: dict[int, TorchOptimizerState] = {}
        for part in optimizer_parts(optimizer):
            inner = part if isinstance(part, torch.optim.Optimizer) else getattr(part, "optimizer", None)
            kind = type(part).__name__
            if isinstance(part, MixedPrecisionOptimizer):  # Float16OptimizerWithFloat16Params, DistributedOptimizer
                raise NotImplementedError(
                    f"moving experts with the state of a Megatron {kind}: it keeps fp32 main copies of the "
                    "parameters (mixed precision or the distributed optimizer), which moves do not read or write yet; "
                    "train in fp32 without use_distributed_optimizer, or set replace_every=0")
            if not isinstance(inner, torch.optim.Optimizer):
                raise ValueError(f"optimizer={kind}: expected a Megatron optimizer over a torch optimizer")
            access = TorchOptimizerState(inner)
            for group in inner.param_groups:
                for p in group["params"]:
                    self._of[id(p)] = access

    def _access(self, param: nn.Parameter) -> TorchOptimizerState:
        access = self._of.get(id(param))
        if access is None:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is in no optimizer of "
                             f"{type(self.optimizer).__name__}: build the optimizer on the whole model")
        return access

    def read(self, param: nn.Parameter, *, grad: bool) -> State:
        return self._access(param).read(param, grad=grad)

    def write(self, param: nn.Parameter, state: Mapping[str, Any]) -> None:
        self._access(param).write(param, state)
