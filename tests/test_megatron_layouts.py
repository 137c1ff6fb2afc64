"""Megatron layouts with the large-EP layer on 4 gloo ranks: TP 2 x EP 2 and PP 2 x EP 2 build and run.

TP 2 x EP 2 runs forward and backward in eval mode: Megatron's ``MoELayer`` refuses to *train* with TP > 1 but
without sequence parallelism, and the sequence-parallel all-gather allocates on CUDA, so the training flag is the
one thing CPU cannot have here (dropout is 0, so the computation is the same). Checked: the expert each rank holds,
identical per-token losses across a TP pair, expert gradients identical across each expert's data-parallel pair and router
gradients identical on all ranks after ``finalize_model_grads``, and a shared expert alongside.

PP 2 x EP 2 runs a 4-layer GPT split over two stages by hand (activations and their gradients sent with
``torch.distributed``; Megatron's pipeline schedules allocate on CUDA). Checked: each stage holds its own layers,
every expert of both stages gets a gradient, and the distributed-checkpoint key of a stage-1 expert carries the
global layer index and the global expert id.
"""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import world  # noqa: E402
from megatron_helpers import init_megatron, tiny_config, tiny_gpt, tokens  # noqa: E402

VOCAB, SEQ, BATCH = 32, 8, 2


def _gather(t: torch.Tensor) -> list[list[float]]:
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return [o.flatten().tolist() for o in out]


def _tp2_ep2_rank(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from largeep_plugin.integrations.megatron import GlooDataParallel, large_ep_moe_layers

    init_megatron(tp=2, ep=2)
    cfg = tiny_config(num_layers=2, moe_shared_expert_intermediate_size=8)
    model = tiny_gpt(cfg, vocab=VOCAB, seq=SEQ)
    model.eval()
    ids, pos = tokens(BATCH, SEQ, VOCAB, seed=ps.get_data_parallel_rank())  # the same tokens within a TP pair
    per_token_loss = model(ids, pos, None, labels=ids)  # vocab-parallel cross entropy: the same on a TP pair
    per_token_loss.float().mean().backward()
    finalize_model_grads([GlooDataParallel(cfg, model)])
    layers = dict(large_ep_moe_layers(model))
    layer = layers["layer_1"]
    return {
        "expert_id": layer.expert_id,
        "ep_ranks": dist.get_process_group_ranks(layer.ep_group),
        "expt_dp_ranks": dist.get_process_group_ranks(ps.get_expert_data_parallel_group()),
        "tp_ranks": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "loss": _gather(per_token_loss.detach()),
        "expert_grads": _gather(layer.experts.expert.fc1.weight.grad),
        "router_grads": _gather(layer.router.weight.grad),
        "shared_expert": layer.shared_experts is not None and layer.shared_experts.linear_fc1.weight.grad is not None,
        "finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None),
    }


def test_tp2_ep2_builds_and_runs() -> None:
    results = world(_tp2_ep2_rank, 4, timeout=180)
    for rank, r in enumerate(results):
        assert r["finite"] and r["shared_expert"], r
        assert r["expert_id"] == r["ep_ranks"].index(rank)
        tp_peer = [p for p in r["tp_ranks"] if p != rank][0]
        assert r["loss"][rank] == r["loss"][tp_peer], "per-token losses differ across a TP pair"
        for peer in r["expt_dp_ranks"]:
            assert r["expert_grads"][rank] == r["expert_grads"][peer], "expert gradients differ across expert-DP"
        assert all(g == r["router_grads"][0] for g in r["router_grads"]), "router gradients differ across ranks"
    assert {r["expert_id"] for r in results} == {0, 1}


def _pp2_ep2_rank(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from largeep_plugin.integrations.megatron import large_ep_moe_layers

    init_megatron(pp=2, ep=2)
    cfg = tiny_config(num_layers=4, pipeline_dtype=torch.float32)
    model = tiny_gpt(cfg, vocab=VOCAB, seq=SEQ)
    ids, pos = tokens(BATCH, SEQ, VOCAB, seed=ps.get_data_parallel_rank())
    shape = (SEQ, BATCH, cfg.hidden_size)
    out: dict[str, Any] = {"stage": ps.get_pipeline_model_parallel_rank()}
    if ps.is_pipeline_first_stage():
        hidden = model(ids, pos, None)
        dist.send(hidden.detach(), ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty(shape)
        dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
        hidden.backward(grad)
    else:
        hidden = torch.empty(shape)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        hidden.requires_grad_(True)
        model.set_input_tensor(hidden)
        loss = model(None, pos, None, labels=ids).float().mean()
        loss.backward()
        dist.send(hidden.grad, ps.get_pipeline_model_parallel_prev_rank())
        out["loss"] = float(loss)
    layers = list(large_ep_moe_layers(model))
    out["layers"] = [name for name, _ in layers]
    out["expert_grad_norms"] = [float(layer.experts.expert.fc1.weight.grad.norm()) for _, layer in layers]
    out["expert_id"] = layers[0][1].expert_id
    key = "decoder.layers.1.mlp.experts.expert.fc1.weight"
    sh = model.sharded_state_dict()[key]
    out["ckpt"] = (sh.key, sh.global_shape, sh.global_offset)
    return out


def test_pp2_ep2_builds_and_runs() -> None:
    results = world(_pp2_ep2_rank, 4, timeout=180)
    for r in results:
        stage = r["stage"]
        assert r["layers"] == (["layer_1", "layer_2"] if stage == 0 else ["layer_3", "layer_4"])
        assert min(r["expert_grad_norms"]) > 0, r
        key, global_shape, offset = r["ckpt"]
        assert key == "decoder.layers.mlp.experts.expert.fc1.weight"
        assert global_shape[:2] == (4, 2)  # [layers, experts, ...]
        assert offset[:2] == (2 * stage + 1, r["expert_id"])
    losses = [r["loss"] for r in results if r["stage"] == 1]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
