"""Data-parallel copies of the EP group, and the per-step knobs of the layer.

One world of 4 ranks holds two copies of a 2-expert EP group, contiguous ([0, 1], [2, 3]) and strided ([0, 2],
[1, 3], as with tensor parallelism inside a node). Checked: after ``allreduce_gradients`` every expert's gradient
is the same in both copies and equals the dense reference's over all four ranks' tokens; evaluation and no-grad
forwards do not count towards the bias; the bias update can sum counts over the copies; ``aux_loss_scale`` scales
the gradient of the attached auxiliary loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from conftest import HIDDEN, expert_grads, global_batch, make_config, rank_slice, rel_err, router_grad_error, world
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference

E, T = 2, 10


def _copies_world(rank: int, world_size: int) -> dict:
    out: dict = {}
    partitions = {"contiguous": [[0, 1], [2, 3]], "strided": [[0, 2], [1, 3]]}
    for name, copies in partitions.items():
        groups = [dist.new_group(c) for c in copies]  # every rank creates every group, in one order
        mine = next(i for i, c in enumerate(copies) if rank in c)
        cfg = make_config(E, top_k=1, aux_loss_coeff=0.0)
        layer = LargeEPMoE(cfg, ep_group=groups[mine])
        ref = DenseMoEReference(cfg)
        # Tokens of the whole world in global-rank order; the loss is sum(y * g) over all of them.
        counts = [T] * world_size
        x_GH, g_GH = global_batch(counts, HIDDEN, seed=11)
        own = rank_slice(counts, rank)
        (layer(x_GH[own]) * g_GH[own]).sum().backward()
        allreduce_gradients(layer, average=False)
        (ref(x_GH) * g_GH).sum().backward()
        want = expert_grads(ref.experts[layer.expert_id])
        errs = {k: rel_err(v, want[k]) for k, v in expert_grads(layer.expert).items()}
        # Top-1 renormalised: the weight is s / s = 1, the router gradient rounding noise (absolute error then).
        errs["router"] = router_grad_error(cfg, layer.router.weight.grad, ref.router.weight.grad)
        out[name] = errs

        # Evaluation and no-grad forwards leave the bias counts alone; a training forward adds to them.
        after_training_forward = int(layer.tokens_per_expert_since_update.sum())
        layer.eval()
        layer(x_GH[own])
        layer.train()
        with torch.no_grad():
            layer(x_GH[own])
        out[f"{name}_counted_outside_training"] = (
            int(layer.tokens_per_expert_since_update.sum()) - after_training_forward
        )
        layer(x_GH[own])
        in_copy = int(layer.tokens_per_expert_since_update.sum()) - after_training_forward
        # Summed over the copies (ranks with the same EP rank), both copies apply one bias update.
        dp_group = dist.new_group([copies[0][0], copies[1][0]]), dist.new_group([copies[0][1], copies[1][1]])
        layer.update_expert_bias(dp_group[copies[mine].index(rank)])
        bias = layer.router.expert_bias.clone()
        everyone = [torch.empty_like(bias) for _ in range(world_size)]
        dist.all_gather(everyone, bias)
        out[f"{name}_tokens_in_copy"] = in_copy
        out[f"{name}_bias_same_everywhere"] = all(torch.equal(b, bias) for b in everyone)
    return out


def test_data_parallel_copies_reduce_expert_gradients_and_share_one_bias() -> None:
    results = world(_copies_world, 4)
    for rank, res in enumerate(results):
        for name in ("contiguous", "strided"):
            bad = {k: v for k, v in res[name].items() if not v <= 1e-5}
            assert not bad, f"rank {rank}, {name} copies: gradients differ from the dense reference: {bad}"
            assert res[f"{name}_counted_outside_training"] == 0, (rank, name)
            assert res[f"{name}_tokens_in_copy"] == 2 * T, (rank, name)  # top-1, two ranks of T tokens per copy
            assert res[f"{name}_bias_same_everywhere"], (rank, name)


def _aux_scale_world(rank: int, world_size: int) -> float:
    cfg = make_config(2, top_k=1, normalize_topk=False, aux_loss_coeff=0.5)
    x = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(rank))
    grads = []
    for scale in (1.0, 3.0):
        layer = LargeEPMoE(cfg)
        layer.aux_loss_scale = scale
        layer(x).sum().mul(0.0).backward()  # only the attached auxiliary loss sends a gradient
        grads.append(layer.router.weight.grad.clone())
    assert float(grads[0].abs().max()) > 0, "the auxiliary loss sent no gradient"
    return rel_err(grads[1], 3.0 * grads[0])


def test_aux_loss_scale_scales_the_attached_gradient() -> None:
    assert max(world(_aux_scale_world, 2)) < 1e-5
