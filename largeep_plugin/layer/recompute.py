"""Which forwards count the routing load: each real training forward once, also under activation checkpointing.

A layer adds its global token counts to its load history (the bias update's counts, the global-batch loss's counts,
a planner's counts) in training forwards. Activation checkpointing runs a layer's forward twice, and the two kinds of
torch checkpoint differ in which run has gradients:

    non-reentrant (``use_reentrant=False``, transformers' default): the first run has gradients; the recompute runs
        inside the backward pass and may stop early, once it has recomputed what the backward needs;
    reentrant (``use_reentrant=True``, Megatron's ``tensor_parallel.checkpoint``): the first run has none (no_grad);
        the recompute, inside the backward pass, runs the whole forward with gradients.

So a training forward counts when it runs outside a backward pass with gradients, or inside one (a recompute) when
the first run of that forward had none. ``LoadCounting`` keeps one number per layer for the second case: how many
training forwards ran without gradients since the last forward that counted.
"""
from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread: a forward now is an activation-checkpoint
    recompute (torch sets the graph task for the thread that executes it)."""
    return torch._C._current_graph_task_id() != -1


class LoadCounting:
    """Decides, once per forward, whether that forward's load counts (module docstring). Ask ``counts`` exactly
    once per forward, before anything that depends on the answer; ``reset`` after the optimizer step."""

    def __init__(self) -> None:
        # Training forwards run without gradients and not yet recomputed: the first runs of reentrant checkpoints
        # (or no_grad forwards of a model left in training mode, which never count).
        self._without_grad = 0

    # Run eagerly under torch.compile: the answer depends on whether a backward is running when the forward runs,
    # which a compiled graph would not check again (a graph break in the layer, beside the count read-back's).
    @torch.compiler.disable
    def counts(self, training: bool) -> bool:
        if not training:
            return False
        if in_backward():
            if torch.is_grad_enabled() and self._without_grad > 0:
                self._without_grad -= 1
                return True   # a reentrant recompute: its first run counted nothing
            return False      # a non-reentrant recompute: its first run counted already
        if not torch.is_grad_enabled():
            self._without_grad += 1
            return False
        self._without_grad = 0  # a forward with gradients outside backward: whatever ran without them is not pending
        return True

    def reset(self) -> None:
        self._without_grad = 0
