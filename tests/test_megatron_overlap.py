"""Megatron's fine-grained EP overlap (``overlap_moe_expert_parallel_comm``) driving the large-EP layer, at EP 4.

Megatron's combined 1F1B schedule cuts a MoE ``TransformerLayer`` into four nodes (attention + router + dispatch
preprocess, dispatch, experts, combine) built by ``build_transformer_layer_callables``; each
``TransformerLayerNode`` detaches its inputs, backpropagates on its own, and frees the inputs of the dispatch,
expert and combine nodes right after their forward. The schedule needs CUDA streams, and Megatron asserts
EP > 1, so no single GPU runs it either. Here Megatron's own callables and ``TransformerLayerNode`` run on CPU
(the CUDA-only calls they make, NVTX ranges and ``record_stream``, are no-ops in this test process) in the
1F1B-overlap order: micro-batch 1's forward nodes alternate with micro-batch 0's backward nodes.

Checked against the same layer run as one module (itself checked against the dense reference in
tests/test_megatron_layer.py): outputs, input gradients and every parameter gradient (attention, norms, router
with the switch loss and z-loss, experts), for one expert per rank and for colocated experts with capacity drops.
The freed inputs really are freed (storage of size 0), so a backward that needed one would fail here.

The schedule runs bf16 models only (a Megatron rule): the layer cast to bf16, as ``Float16Module`` casts its
module, matches float32 within bf16 rounding, and the router's bias and counts stay float32.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402

from conftest import rel_err, world  # noqa: E402
from megatron_helpers import init_megatron, placement_for, tiny_config  # noqa: E402

EP = 4
TOL = 1e-5
NODE_NAMES = ("attn", "moe_dispatch", "mlp", "moe_combine")


class _NoStreamEvent:
    """``torch.cuda.Event`` for CPU: one stream, nothing to order."""

    def wait(self, stream: Any = None) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass


@contextlib.contextmanager
def _cpu_schedule_nodes():
    """The CUDA-only calls of Megatron's schedule nodes, made no-ops for this (forked) test process."""
    with mock.patch.object(torch.cuda.nvtx, "range_push", lambda *a, **k: None), \
            mock.patch.object(torch.cuda.nvtx, "range_pop", lambda *a, **k: None), \
            mock.patch.object(torch.cuda, "current_stream", lambda *a, **k: None), \
            mock.patch.object(torch.Tensor, "record_stream", lambda self, stream: None):
        yield


def _layer_nodes(layer: Any, config: Any) -> list[Any]:
    from megatron.core.models.gpt.fine_grained_callables import (
        TransformerLayerNode,
        TransformerLayerState,
        build_transformer_layer_callables,
    )

    funcs, _ = build_transformer_layer_callables(layer)
    chunk = SimpleNamespace(
        attention_mask=None, rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, packed_seq_params=None,
        sequence_len_offset=None, model=SimpleNamespace(decoder=SimpleNamespace(final_layernorm=None)),
    )
    state = TransformerLayerState()
    return [
        TransformerLayerNode(None, _NoStreamEvent(), state, chunk, func, name=name,
                             extra_args={"config": config, "is_moe": True})
        for func, name in zip(funcs[:4], NODE_NAMES)
    ]


def _grads(layer: Any) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out


def _overlap_vs_module(rank: int, world_size: int, variant: str) -> dict[str, float]:
    from megatron.core.transformer.spec_utils import build_module

    from largeep_plugin.integrations.megatron import LargeEPMoELayer, TorchSDPAttention, get_gpt_layer_spec_with_large_ep

    init_megatron(ep=EP)
    experts, extra = (EP, {}) if variant == "one_per_rank" else (2 * EP, dict(moe_expert_capacity_factor=1.0))
    config = tiny_config(
        num_moe_experts=experts, bf16=True, moe_token_dispatcher_type="alltoall", overlap_moe_expert_parallel_comm=True, moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3, **extra,
    )
    spec = get_gpt_layer_spec_with_large_ep(experts, core_attention=TorchSDPAttention,
                                            placement=placement_for(experts, EP))
    torch.manual_seed(0)
    # The colocation warning: once per world, by rank 0.
    with pytest.warns(UserWarning, match="colocated") if experts > EP and rank == 0 else contextlib.nullcontext():
        layer = build_module(spec, config=config, layer_number=1)
    assert isinstance(layer.mlp, LargeEPMoELayer)

    gen = torch.Generator().manual_seed(200 + rank)
    xs = [torch.randn(6, 2, config.hidden_size, generator=gen) for _ in range(2)]
    gs = [torch.randn(6, 2, config.hidden_size, generator=gen) for _ in range(2)]

    # The layer as one module: micro-batch 0 then 1, gradients accumulated.
    ref_y, ref_dx = [], []
    for x, g in zip(xs, gs):
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        (y * g).sum().backward()
        ref_y.append(y.detach())
        ref_dx.append(xi.grad)
    ref_grads = _grads(layer)
    drops = int(layer.mlp.last_stats.dropped)

    # Megatron's nodes in the 1F1B-overlap order.
    errors: dict[str, float] = {}
    with _cpu_schedule_nodes():
        mb = [_layer_nodes(layer, config) for _ in range(2)]
        ins = [x.clone().requires_grad_(True) for x in xs]
        out = ins[0]
        for node in mb[0]:
            out = node.forward(out)
        ys = [out, None]
        freed = [mb[0][i].inputs[0].untyped_storage().size() == 0 for i in (1, 2, 3)]
        grad, out = gs[0], ins[1]
        for f_node, b_node in zip(mb[1], reversed(mb[0])):
            out = f_node.forward(out)
            grad = b_node.backward(grad)
        ys[1], dxs = out, [grad, None]
        grad = gs[1]
        for b_node in reversed(mb[1]):
            grad = b_node.backward(grad)
        dxs[1] = grad
    got_grads = _grads(layer)

    for i in range(2):
        errors[f"y{i}"] = rel_err(ys[i].detach(), ref_y[i])
        errors[f"dx{i}"] = rel_err(dxs[i], ref_dx[i])
    assert sorted(got_grads) == sorted(ref_grads), (sorted(got_grads), sorted(ref_grads))
    for name, want in ref_grads.items():
        errors[name] = rel_err(got_grads[name], want)
    return {"errors": errors, "freed": freed, "drops": drops, "router_grad": float(ref_grads["mlp.router.weight"].abs().max())}


@pytest.mark.parametrize("variant", ["one_per_rank", "colocated_with_drops"])
def test_fine_grained_overlap_nodes_equal_the_layer(variant: str) -> None:
    results = world(_overlap_vs_module, EP, variant, timeout=240.0)
    for rank, res in enumerate(results):
        assert all(res["freed"]), f"rank {rank}: the dispatch/expert/combine inputs were not freed: {res['freed']}"
        worst = max(res["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, f"rank {rank}: {worst}"
        assert res["router_grad"] > 0
    if variant == "colocated_with_drops":
        assert results[0]["drops"] > 0, "capacity 1.0 with these tokens should drop some assignments"


def _bf16_vs_fp32(rank: int, world_size: int) -> dict[str, Any]:
    """The schedule above runs bf16 models: the layer cast to bf16 (what Megatron's ``Float16Module`` does to its
    module) against the same layer in float32, sigmoid routing with Megatron's bias update on."""
    from megatron.core.transformer.spec_utils import build_module

    from largeep_plugin.integrations.megatron import TorchSDPAttention, get_gpt_layer_spec_with_large_ep

    init_megatron(ep=world_size)
    gen = torch.Generator().manual_seed(300 + rank)
    x = torch.randn(6, 2, 12, generator=gen)
    g = torch.randn(6, 2, 12, generator=gen)
    out = {}
    for bf16 in (False, True):
        config = tiny_config(bf16=bf16, moe_token_dispatcher_type="alltoall", moe_router_score_function="sigmoid",
                             moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.0)
        torch.manual_seed(0)
        layer = build_module(get_gpt_layer_spec_with_large_ep(world_size, core_attention=TorchSDPAttention),
                             config=config, layer_number=1)
        if bf16:
            layer = layer.bfloat16()
        xi = (x.bfloat16() if bf16 else x.clone()).requires_grad_(True)
        y, _ = layer(xi)
        (y.float() * g).sum().backward()
        out[bf16] = {"y": y.detach().float(), "dx": xi.grad.float(), "y_dtype": y.dtype,
                     "fc1": layer.mlp.experts.expert.fc1.weight.grad.float(),
                     "router": layer.mlp.router.weight.grad.float(),
                     "bias_dtype": layer.mlp.router.expert_bias.dtype,
                     "counts_dtype": layer.mlp.router.local_tokens_per_expert.dtype}
    ref, got = out[False], out[True]
    return {"errors": {k: rel_err(got[k], ref[k]) for k in ("y", "dx", "fc1", "router")},
            "dtypes": (got["y_dtype"], got["bias_dtype"], got["counts_dtype"])}


def test_layer_in_bf16_matches_float32_within_bf16_rounding() -> None:
    for rank, res in enumerate(world(_bf16_vs_fp32, 2)):
        assert res["dtypes"] == (torch.bfloat16, torch.float32, torch.float32), (rank, res["dtypes"])
        # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %): a few roundings deep, a few percent at most.
        assert max(res["errors"].values()) < 3e-2, (rank, res["errors"])
        assert min(res["errors"].values()) > 0, (rank, res["errors"])  # it really ran in bf16
