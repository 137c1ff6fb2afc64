"""The block that replaces a Hugging Face MoE block: same forward contract, large-EP inside.

Contract kept (transformers 5.x, every registered family): ``forward(hidden_states [B, S, H]) -> [B, S, H]``, and the
router logits [B*S, E] reach ``output_router_logits=True`` and the load-balancing loss. Transformers collects those
with a forward hook on every module that ``isinstance`` its family's router class (``OutputRecorder(<Router>,
index=0)``), installed on first use. So the block keeps the Hugging Face router *object* as ``gate``, emptied of its
weights (they now live in ``moe.router``) and turned into a tap: our router's logits pass through it, which fires
the hook whether it was installed before the conversion or after.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from largeep_plugin.layer.moe_layer import LargeEPMoE

from .families import Family

_TAP_CLASSES: dict[type, type] = {}


class _RouterLogitsTap(nn.Module):
    """forward(logits_TE) -> (logits_TE,): what the Hugging Face router returns first, nothing computed."""

    def forward(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor]:  # type: ignore[override]
        return (logits_TE,)

    def extra_repr(self) -> str:
        return "router logits of the large-EP layer (no weights)"


def as_logits_tap(gate: nn.Module) -> nn.Module:
    """Turn the Hugging Face router ``gate`` into a weightless tap, in place (its hooks and class ancestry stay)."""
    base = type(gate)
    if base not in _TAP_CLASSES:
        _TAP_CLASSES[base] = type(f"LargeEPRouterLogits_{base.__name__}", (_RouterLogitsTap, base), {})
    gate._parameters.clear()
    gate._buffers.clear()
    gate.__class__ = _TAP_CLASSES[base]
    return gate


class LargeEPHFBlock(nn.Module):
    """A Hugging Face MoE block run by ``moe`` (a ``LargeEPMoE``); ``family`` says how its weights map (weights.py).

    Attributes:
        moe: the large-EP layer: router, this rank's experts, shared expert and its gate.
        gate (gpt-oss: router): the router-logits tap (see the module docstring).
        family: the ``Family`` the block came from.
    """

    def __init__(self, moe: LargeEPMoE, gate: nn.Module, family: Family):
        super().__init__()
        self.moe = moe
        self.family = family
        # Under the Hugging Face router's own name (``gate``, gpt-oss ``router``).
        self.add_module(family.router, as_logits_tap(gate))
        # Every router forward sends its logits through the tap: no per-call state on self.
        moe.router.register_forward_hook(self._tap)

    def _tap(self, _router: nn.Module, _args: tuple, routing: object) -> None:
        self._modules[self.family.router](routing.logits_TE)  # returns None: a hook's return value would replace the router's output

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.family.returns_scores:
            return self.moe(hidden_states)
        # gpt-oss also returns the top-k combine weights [T, K]: caught from this one router call.
        weights: list[torch.Tensor] = []
        handle = self.moe.router.register_forward_hook(
            lambda _module, _args, routing: weights.append(routing.topk_weights_TK))
        try:
            y = self.moe(hidden_states)
        finally:
            handle.remove()
        return y, weights[0].to(y.dtype)

    def extra_repr(self) -> str:
        return f"family={self.family.name}"
