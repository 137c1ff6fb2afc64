"""Dense single-process MoE with the same math as ``LargeEPMoE``: the oracle of the tests.

Shape legend:
    T  tokens      H  hidden size      E  experts      K  top_k

All E experts live in one process and are applied with an obvious loop; no communication, no permutation.
Expert e starts from exactly the weights that expert e starts from in the sharded layer (same seed), and
``shard_state(e)`` gives what a rank holding expert e should load.

Capacity is decided per call over the tokens of that call, as the sharded layer decides it per rank: to compare
with an EP run under a capacity factor, call the reference on each rank's tokens separately.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import LargeEPConfig
from .experts import ExpertMLP
from .load_balance import switch_aux_loss, z_loss
from .router import Router


class DenseMoEReference(nn.Module):
    """``forward(x [..., H]) -> y [..., H]``; ``forward(x, return_aux=True) -> (y, aux)``."""

    def __init__(self, config: LargeEPConfig):
        super().__init__()
        self.config = config
        self.router = Router(config.router_config, config.hidden_size, init_std=config.init_std, init_seed=config.init_seed)
        self.experts = nn.ModuleList(
            ExpertMLP(config.expert_config, expert_id=e, init_seed=config.init_seed) for e in range(config.num_experts)
        )

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        cfg = self.config
        x_TH = x.reshape(-1, cfg.hidden_size)
        routing = self.router(x_TH)
        t, k = routing.topk_ids_TK.shape
        out_TKH = x_TH.new_zeros((t, k, cfg.hidden_size))
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero((routing.topk_ids_TK == e) & routing.keep_TK, as_tuple=True)
            if tok.numel():
                out_TKH[tok, slot] = expert(x_TH[tok])
        y_TH = (out_TKH.float() * routing.topk_weights_TK.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        y = y_TH.view(x.shape)
        if not return_aux:
            return y
        aux = x_TH.new_zeros((), dtype=torch.float32)
        if cfg.aux_loss_coeff > 0:
            aux = aux + cfg.aux_loss_coeff * switch_aux_loss(
                routing.scores_TE, routing.tokens_per_expert_E, cfg.top_k, cfg.score_function
            )
        if cfg.z_loss_coeff > 0:
            aux = aux + cfg.z_loss_coeff * z_loss(routing.logits_TE)
        return y, aux

    def shard_state(self, expert_id: int) -> dict[str, torch.Tensor]:
        """State dict for a ``LargeEPMoE`` that holds ``expert_id`` (router + that expert)."""
        state = {f"router.{k}": v for k, v in self.router.state_dict().items()}
        state.update({f"expert.{k}": v for k, v in self.experts[expert_id].state_dict().items()})
        return state
