"""The model families inside a Megatron-Core ``TransformerLayer`` at EP 4 (4 gloo ranks, one world):

* DeepSeek-V3 shape: sigmoid scores with Megatron's expert bias, ``moe_router_num_groups=4`` /
  ``moe_router_group_topk=2``, top-4 of 16 experts (4 colocated per rank), ``moe_router_topk_scaling_factor=2.5``,
  a shared expert run during the dispatch (``moe_shared_expert_overlap``), ``seq_aux_loss``;
* Qwen2-MoE shape: softmax without renormalisation (``moe_router_pre_softmax``), a gated shared expert;
* gpt-oss shape: ``add_bias_linear`` (router and expert biases), quick_gelu GLU with ``glu_linear_offset=1`` and
  ``activation_func_clamp_value`` (the clamped SwiGLU), routed in float64 (``moe_router_dtype='fp64'``);

each equal, forward and backward (output, input gradient, attention/norm gradients, router weight and bias, every
expert summed over ranks, the shared expert and its gate), to the same ``TransformerLayer`` whose mlp is the
plugin's independent dense reference (``layer/reference.py``, fed [B, S, H]: Megatron's sequences) with the
shared expert's weights read from Megatron's module by name. And ``global_aux_loss`` (Qwen3): the loss counts
every rank's tokens over the micro-batches since the last reset, and ``finalize_model_grads`` resets it.
"""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import assert_parity, merge_ranks, rel_err, world  # noqa: E402
from megatron_helpers import compare_transformer_layers, init_megatron, layer_and_reference, placement_for, tiny_config  # noqa: E402

EP = 4


class _ReferenceMLP(torch.nn.Module):
    """``DenseMoEReference`` as a TransformerLayer mlp: Megatron's [S, B, H] in, the reference's [B, S, H] inside;
    its losses join the backward as the large-EP router attaches them (``MoEAuxLossAutoScaler``)."""

    def __init__(self, config: Any, **_: Any):
        super().__init__()
        from largeep_plugin.integrations.megatron import large_ep_config_from_megatron
        from largeep_plugin.layer.reference import DenseMoEReference

        self.ref = DenseMoEReference(large_ep_config_from_megatron(config))

    def forward(self, x: torch.Tensor, padding_mask: Any = None):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        y, aux = self.ref(x.transpose(0, 1), return_aux=True)
        return MoEAuxLossAutoScaler.apply(y.transpose(0, 1), aux), None


def _copy_shared_expert(layer: Any, ref: Any) -> None:
    """Megatron's shared expert (its own initialisation) -> the reference, by name."""
    shared = layer.mlp.shared_experts
    if shared is None:
        return
    names = {"shared_expert.fc1.weight": "linear_fc1.weight", "shared_expert.fc2.weight": "linear_fc2.weight",
             "shared_expert_gate.weight": "gate_weight"}
    own = dict(shared.named_parameters())
    ref.mlp.ref.load_layer_state({mine: own[theirs] for mine, theirs in names.items() if theirs in own})


def _parity(config: Any, rank: int, experts: int) -> dict[str, float]:
    from largeep_plugin.integrations.megatron import LargeEPMoELayer, TorchSDPAttention, get_gpt_layer_spec_with_large_ep

    placement = placement_for(experts, EP)
    spec = get_gpt_layer_spec_with_large_ep(experts, core_attention=TorchSDPAttention, placement=placement)
    layer, ref = layer_and_reference(spec, config, _ReferenceMLP)
    _copy_shared_expert(layer, ref)
    assert isinstance(layer.mlp, LargeEPMoELayer)
    # A non-zero selection bias, the same in both (DeepSeek-V3's bias is Megatron's expert_bias).
    bias_E = torch.randn(experts, generator=torch.Generator().manual_seed(5)) * 0.05
    layer.mlp.router.expert_bias.copy_(bias_E)
    ref.mlp.ref.router.expert_bias.copy_(bias_E)

    errors, y_ref = compare_transformer_layers(layer, ref, config.hidden_size, rank)
    router, ref_router = layer.mlp.router, ref.mlp.ref.router
    errors["router.weight"] = rel_err(router.weight.grad, ref_router.weight.grad)
    assert (router.bias is not None) == bool(config.add_bias_linear)  # Megatron's router linear has a bias then
    if router.bias is not None:
        errors["router.bias"] = rel_err(router.bias.grad, ref_router.bias.grad)
    shared = layer.mlp.shared_experts
    if shared is not None:
        errors["shared.fc1"] = rel_err(shared.linear_fc1.weight.grad, ref.mlp.ref.shared_expert.fc1.weight.grad)
        errors["shared.fc2"] = rel_err(shared.linear_fc2.weight.grad, ref.mlp.ref.shared_expert.fc2.weight.grad)
        if shared.gate_weight is not None:
            errors["shared.gate"] = rel_err(shared.gate_weight.grad, ref.mlp.ref.shared_expert_gate.weight.grad)
    # Each rank's experts saw every rank's tokens: their gradients are the sums over ranks of the reference's.
    for expert in ref.mlp.ref.experts:
        for p in expert.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    for e, module in layer.mlp.experts.experts_by_id():
        for name, p in module.named_parameters():
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            errors[f"expert.{name}"] = max(errors.get(f"expert.{name}", 0.0),
                                           rel_err(got, ref.mlp.ref.experts[e].get_parameter(name).grad))
    errors["ref_scale"] = float(min(y_ref.abs().max(), ref_router.weight.grad.abs().max()))
    return errors


def _global_loss_check(rank: int) -> dict[str, float]:
    """global_aux_loss: with the output's gradient zero, the router gets the gradient of c * switch(this rank's
    scores, counts of every rank and of both micro-batches); finalize_model_grads resets the counts."""
    from megatron.core.distributed import finalize_model_grads

    from largeep_plugin.integrations.megatron import GlooDataParallel, LargeEPMoELayer
    from largeep_plugin.layer.load_balance import switch_aux_loss

    cfg = tiny_config(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1)
    layer = LargeEPMoELayer(cfg, layer_number=1)
    xs = [torch.randn(6, 2, 12, generator=torch.Generator().manual_seed(10 * m + r)) for m in range(2)
          for r in range(EP)]
    for m in range(2):
        layer.router.weight.grad = None
        y, _ = layer(xs[EP * m + rank])
        (0.0 * y).sum().backward()
    counts = torch.zeros(EP)
    with torch.no_grad():
        for x in xs:
            counts += layer.router.route_tokens(x.reshape(-1, 12)).tokens_per_expert_E.float()
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    scores = torch.softmax(xs[EP + rank].reshape(-1, 12) @ weight.t(), dim=-1)
    (0.1 * switch_aux_loss(scores, counts, 2, "softmax")).backward()
    out = {"grad": rel_err(layer.router.weight.grad, weight.grad),
           "counts": float((layer.router.global_tokens_per_expert - counts).abs().max())}
    finalize_model_grads([GlooDataParallel(cfg, layer)])
    out["after_reset"] = float(layer.router.global_tokens_per_expert.abs().sum())
    return out


def _families_rank(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    init_megatron(ep=EP)
    dsv3 = tiny_config(
        num_moe_experts=16, moe_router_topk=4, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
        moe_shared_expert_intermediate_size=16, moe_shared_expert_overlap=True, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.01, moe_router_dtype="fp32",
        gated_linear_unit=True, activation_func=F.silu, moe_ffn_hidden_size=8,
    )
    qwen2 = tiny_config(
        moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True,
        gated_linear_unit=True, activation_func=F.silu,
    )
    oss = tiny_config(
        add_bias_linear=True, gated_linear_unit=True, activation_func=quick_gelu, glu_linear_offset=1.0,
        activation_func_clamp_value=1.5, bias_activation_fusion=False, moe_router_dtype="fp64",
    )
    return {
        "parity": {"dsv3": _parity(dsv3, rank, 16), "qwen2": _parity(qwen2, rank, EP), "gpt-oss": _parity(oss, rank, EP)},
        "global": _global_loss_check(rank),
    }


def test_model_families_in_a_megatron_transformer_layer() -> None:
    results = world(_families_rank, EP, timeout=300)
    assert_parity(merge_ranks([r["parity"] for r in results]))
    for r in results:
        g = r["global"]
        assert g["grad"] < 1e-5 and g["counts"] == 0.0 and g["after_reset"] == 0.0, g
