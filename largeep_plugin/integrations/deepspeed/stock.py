"""Stand-in for a user's stock ``deepspeed.moe.layer.MoE``, seeded like the plugin's layers: the baseline that the
benchmarks, the demo, the example and the tests compare against (same weights, same tokens).

Shape legend:
    T  tokens on this rank      H  hidden size      F  expert ffn hidden size      E  experts

``stock_moe_layer(cfg, ep_size)`` builds a ``deepspeed.moe.layer.MoE`` with E = ep_size experts (one per rank)
whose gate and expert hold exactly the weights a ``LargeEPMoE(cfg)`` starts from on this rank, and with the
routing made deterministic (no second-expert sampling, no random token selection), so that the dropless stock
layer and the large-EP layer compute the same function. The stock layer needs DeepSpeed's expert groups, which
``ensure_expert_groups`` creates.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE

from largeep_plugin.layer.comm import group_rank
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.experts import ExpertMLP
from largeep_plugin.models.tiny_moe import MoEFactory, TinyMoEConfig, large_ep_config
from largeep_plugin.layer.router import Router
from .engine import ensure_expert_groups


def stock_expert(cfg: LargeEPConfig) -> nn.Sequential:
    """The stock expert ``Linear(H, F) -> exact GELU -> Linear(F, H)`` (the layout the converter reads)."""
    if cfg.activation != "gelu":
        raise NotImplementedError(f"stock experts are built for activation='gelu' only, not {cfg.activation!r}")
    return nn.Sequential(
        nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.linear_bias),
        nn.GELU(),
        nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.linear_bias),
    )


def stock_moe_layer(cfg: LargeEPConfig, ep_size: int, *, capacity_factor: float | None = None,
                    min_capacity: int = 4, attach_groups: bool = True) -> MoE:
    """A stock layer with E = ``ep_size`` experts, one per rank, seeded like ``LargeEPMoE(cfg)``.

    Args:
        cfg: the shapes and the seed (``num_experts`` must equal ``ep_size``; ``top_k`` 1 or 2).
        capacity_factor: None for dropless (``drop_tokens=False``); otherwise DeepSpeed's capacity factor.
        min_capacity: DeepSpeed's lower bound on the capacity (used only with a capacity factor).
        attach_groups: give the layer its EP group now; False when a DeepSpeed engine will (it refuses to set the
            group of a layer twice).
    """
    if cfg.num_experts != ep_size:
        raise ValueError(f"num_experts={cfg.num_experts} must equal ep_size={ep_size} (one expert per rank)")
    if cfg.top_k not in (1, 2):
        raise NotImplementedError(f"the stock gate is used with top_k 1 or 2 here, not {cfg.top_k}")
    if cfg.score_function != "softmax":
        raise NotImplementedError("the stock gate scores with softmax only")
    ep_group = ensure_expert_groups(ep_size)
    layer = MoE(
        cfg.hidden_size, stock_expert(cfg), num_experts=cfg.num_experts, ep_size=ep_size, k=cfg.top_k,
        capacity_factor=capacity_factor if capacity_factor is not None else 1.0,
        eval_capacity_factor=capacity_factor if capacity_factor is not None else 1.0,
        min_capacity=min_capacity, drop_tokens=capacity_factor is not None, use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    if attach_groups:
        layer.set_deepspeed_parallelism()
    router = Router(cfg.router_config, cfg.hidden_size, init_std=cfg.init_std, init_seed=cfg.init_seed)
    expert = ExpertMLP(cfg.expert_config, expert_id=group_rank(ep_group), init_seed=cfg.init_seed)
    target = layer.deepspeed_moe.experts.deepspeed_experts[0]
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(router.weight)
        target[0].weight.copy_(expert.fc1.weight)
        target[2].weight.copy_(expert.fc2.weight)
        if cfg.linear_bias:
            target[0].bias.copy_(expert.fc1.bias)
            target[2].bias.copy_(expert.fc2.bias)
    return layer


class StockMoEBlock(nn.Module):
    """Adapts a DeepSpeed-style MoE layer (``forward -> (y, l_aux, exp_counts)``) to a block ``x -> y`` for
    ``TinyMoETransformer``. The layer stays a child named ``moe``, so the engine finds it and the large-EP
    conversion can replace it. ``last_aux`` keeps the latest ``l_aux`` for trainers that add it to the loss."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.last_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux, _ = self.moe(x)
        self.last_aux = aux
        return y


def stock_moe_factory(model: TinyMoEConfig, ep_size: int, *, capacity_factor: float | None = None,
                      attach_groups: bool = True) -> MoEFactory:
    """Stock blocks for ``TinyMoETransformer``, layer i seeded like ``largeep_moe_factory``'s layer i
    (``attach_groups=False`` for a model given to a DeepSpeed engine)."""
    base = large_ep_config(model)

    def build(layer_index: int) -> nn.Module:
        cfg = base.replace(init_seed=base.init_seed + layer_index)
        return StockMoEBlock(
            stock_moe_layer(cfg, ep_size, capacity_factor=capacity_factor, attach_groups=attach_groups)
        )

    return build


def bench_stock_layer(cfg: LargeEPConfig, ep_size: int, capacity_factor: float | None,
                      router_weight_EH: torch.Tensor) -> nn.Module:
    """The stock side of ``largeep_plugin.tools.layer_bench``: ``x_TH -> y_TH`` with the given gate weight."""
    block = StockMoEBlock(stock_moe_layer(cfg, ep_size, capacity_factor=capacity_factor))
    with torch.no_grad():
        block.moe.deepspeed_moe.gate.wg.weight.copy_(router_weight_EH)
    return block
