"""What DeepSpeed's engine does to the loss and the gradients, made to hold for the large-EP layers as well.

Two of the engine's knobs reach past the loss the user hands it, and each needs the layers' side of the bargain:

1. **Gradient clipping at ZeRO stage 0 (fp32).** ``"gradient_clipping"`` (1.0 unless set) runs the engine's
   ``clip_fp32_gradients``, i.e. ``deepspeed.runtime.utils.clip_grad_norm_``, which *averages* the ranks' own norms
   over the data-parallel group ("norm averaging to consider MoE params"). With experts spread over the ranks the
   ranks' norms differ, and their average is not the model's norm (1.2737 where the model's is 1.2874: every update
   1.0108x the plain engine's). On this engine instance ``clip_fp32_gradients`` clips by the model's norm instead
   (``layer/clip.py``: dense parameters once, each logical expert once), and records it as the engine's global
   gradient norm. ZeRO 1-3 and the bf16/fp16 optimizers compute the norm themselves, over the right groups.
2. **The auxiliary loss under gradient accumulation and loss scaling.** ``engine.backward(loss)`` divides the loss
   by ``gradient_accumulation_steps`` and multiplies it by the fp16 loss scale (``optimizer.scale_if_loss``, or the
   torch autocast grad scaler at stage 0); a Hugging Face block's balancing losses are attached to its output
   instead (``moe_layer._AttachAuxLoss``), so they must get the same factor, or they weigh ``gas`` times as much as
   they should. Before every forward (for a torch-style ``loss.backward()``, which the engine scales by ``1 / gas``
   through a hook on the loss) and in ``engine.backward`` (with its ``scale_wrt_gas``), every layer's
   ``aux_loss_scale`` becomes the factor the engine applies to a unit loss at that moment.

``follow_engine(engine)`` installs both on the engine instance (the engine is built inside ``deepspeed.initialize``
and cannot be subclassed; ``initialize`` wraps its ``step`` the same way).
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from largeep_plugin.layer.clip import clip_grad_norm_
from largeep_plugin.layer.moe_layer import set_aux_loss_scale


def loss_factor(engine: Any, scale_wrt_gas: bool = True) -> torch.Tensor:
    """What ``engine.backward`` multiplies a loss by before its backward: ``1 / gradient_accumulation_steps``
    (``scale_wrt_gas``), times the loss scale of its optimizer (fp16) or of its torch autocast grad scaler; float32
    0-d, on the engine's device: built there, so that a scale kept on the device (the grad scaler's) is never read
    back, once per forward, and the layers' backward finds it where their gradients are."""
    unit = torch.ones((), requires_grad=True, device=engine.device)
    scaled = unit / engine.gradient_accumulation_steps() if scale_wrt_gas else unit * 1.0
    if isinstance(engine.optimizer, ZeROOptimizer):
        scaled = engine.optimizer.scale_if_loss(scaled)
    elif getattr(engine, "torch_autocast_z0_gradscaler", None):
        scaled = engine.torch_autocast_z0_gradscaler.scale(scaled)
    return scaled.detach().float()


def follow_engine(engine: Any) -> None:
    """Install the module docstring's clipping and aux-loss scale on ``engine``."""
    model = engine.module
    forward, backward = engine.forward, engine.backward

    def forward_with_aux_scale(*args: Any, **kwargs: Any) -> Any:
        set_aux_loss_scale(model, loss_factor(engine))
        return forward(*args, **kwargs)

    def backward_with_aux_scale(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # engine.backward(loss, retain_graph=False, scale_wrt_gas=True)
        scale_wrt_gas = kwargs.get("scale_wrt_gas", args[1] if len(args) > 1 else True)
        set_aux_loss_scale(model, loss_factor(engine, bool(scale_wrt_gas)))
        return backward(loss, *args, **kwargs)

    def clip_by_the_models_norm() -> torch.Tensor:
        norm = clip_grad_norm_(model.parameters(), engine.gradient_clipping())
        engine._global_grad_norm = norm
        return norm

    engine.forward = forward_with_aux_scale
    engine.backward = backward_with_aux_scale
    engine.clip_fp32_gradients = clip_by_the_models_norm
