"""Moves and resume at another EP size on a converted Hugging Face model, the plain PyTorch (torchrun) route.

4 gloo ranks, tiny Mixtral (4 experts, 2 layers), Adam, a balancing bias updated every second step. The oracle is
the run that neither moved nor stopped, on the same per-rank batches:
    * ``lep.move_experts`` of every layer (expert r to rank 3 - r) between steps 3 and 4 of ten: the losses, the
      final parameters and Adam's moments of every expert (by id) and dense tensor equal the run that never moved
      (1e-6 relative), and the experts did change ranks;
    * ``replace_every=3`` on two emulated nodes, ``lep.rebalance(model, optimizer)``, a router steered to choose
      cross-node pairs: the decision after step 3 moves experts of both layers (the records say what moved where,
      the bytes and the predicted gain), later decisions keep the layout, and the run equals the one with
      ``replace_every=0`` (1e-6);
    * ``lhf.save_training_state`` at EP 4 after step 3 (a load history pending), ``lhf.load_training_state`` into
      a model built anew at EP 2 (two data-parallel copies, two experts per rank), three more steps: equal to six
      steps straight at EP 4 (1e-6); and the same after a move (the moved layout read back by expert id).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from conftest import world  # noqa: E402
from hf_models import steer_pairs, tiny_model, tokens, worst_difference  # noqa: E402

WORLD, BATCH, SEQ, EVERY, EXPERTS = 4, 2, 8, 2, 4


def _build(ep_size: int, seed: int = 0, steer: bool = False, **overrides):  # type: ignore[no-untyped-def]
    import largeep_plugin.hf as lhf
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Link, Topology

    groups = lhf.parallel_groups(ep_size)
    model = tiny_model("mixtral", EXPERTS, seed=seed)
    if steer:
        steer_pairs(model)
    placement = None
    if ep_size == EXPERTS:
        # two nodes of two ranks joined by a slow link without latency: the planner then weighs this tiny
        # model's rows and moves as it would a large model's
        slow = Link(bandwidth_gbytes_per_s=1e-3, latency_us=0.0)
        placement = Placement.identity(EXPERTS, Topology.uniform(2, 2, inter_node=slow))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation
        lhf.convert_model(model, groups.ep_group, placement=placement, allow_colocate=True, bias_update_rate=0.01,
                          **overrides)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), groups


def _layers(model):  # type: ignore[no-untyped-def]
    from largeep_plugin.layer.moe_layer import moe_layers

    return list(moe_layers(model))


def _steps(model, optimizer, groups, rank: int, steps: range, move_at: int | None = None,  # type: ignore[no-untyped-def]
           batch: int = BATCH) -> tuple[list, list]:
    import torch.distributed as dist

    import largeep_plugin as lep

    losses, records = [], []
    for step in steps:
        ids = tokens(batch, SEQ, seed=1000 * step + rank)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        lep.allreduce_gradients(model)
        optimizer.step()
        if (step + 1) % EVERY == 0:
            lep.update_expert_biases(model, groups.dp_group)
        if step == move_at:
            for _, layer in _layers(model):
                home = layer.home_layout()
                lep.move_experts(layer, tuple(home[len(home) - 1 - r] for r in range(len(home))), optimizer)
        records += lep.rebalance(model, optimizer, groups.dp_group)
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    return losses, records


def _logical(model, optimizer) -> dict[str, tuple[torch.Tensor, ...]]:  # type: ignore[no-untyped-def]
    """(value, exp_avg, exp_avg_sq) of every tensor by logical name (experts by id), and each layer's bias."""
    out, experts = {}, set()
    for name, layer in _layers(model):
        for e, module in layer.local_experts():
            for n, p in module.named_parameters():
                experts.add(id(p))
                s = optimizer.state[p]
                out[f"{name}.expert{e}.{n}"] = (p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
        out[f"{name}.bias"] = (layer.router.expert_bias.clone(),)
    for n, p in model.named_parameters():
        if id(p) not in experts:
            s = optimizer.state[p]
            out[n] = (p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
    return out


def _moves_world(rank: int, world_size: int) -> dict:
    out: dict = {}
    # Enough tokens per step (and a steered router) that moving two experts pays within three steps on the slow link.
    batch = 16
    still = _build(4, steer=True)
    still_losses, _ = _steps(*still, rank, range(10), batch=batch)
    out["still"] = (still_losses, _logical(still[0], still[1]))
    moved = _build(4, steer=True)
    layouts = [[layer.home_layout() for _, layer in _layers(moved[0])]]
    moved_losses, _ = _steps(*moved, rank, range(10), move_at=2, batch=batch)
    layouts.append([layer.home_layout() for _, layer in _layers(moved[0])])
    out["moved"] = (moved_losses, _logical(moved[0], moved[1]))
    out["layouts"] = layouts
    planned = _build(4, steer=True, replace_every=3)
    planned_losses, records = _steps(*planned, rank, range(10), batch=batch)
    out["planned"] = (planned_losses, _logical(planned[0], planned[1]))
    out["records"] = [r for r in records if r.get("kind") == "move"]
    return out


def test_moves_on_a_converted_model_are_the_same_math() -> None:
    per_rank = world(_moves_world, WORLD, timeout=600.0)
    still = ([r["still"][0] for r in per_rank][0], [r["still"][1] for r in per_rank])
    moved = (per_rank[0]["moved"][0], [r["moved"][1] for r in per_rank])
    planned = (per_rank[0]["planned"][0], [r["planned"][1] for r in per_rank])
    before, after = per_rank[0]["layouts"]
    assert all(a != b for a, b in zip(before, after)), per_rank[0]["layouts"]
    worst = worst_difference(still, moved)
    assert all(v <= 1e-6 for v in worst.values()), worst
    records = per_rank[0]["records"]
    assert [r["step"] for r in records] == [3, 3, 6, 6, 9, 9], records   # two layers, every third step
    first = records[:2]   # the decision after step 3, one record per layer
    assert all(r["moved"] and r["bytes"] > 0 and r["predicted_gain"] > 0.05 for r in first), first
    assert all(not r["moved"] for r in records[2:]), records   # settled: nothing worth moving any more
    worst = worst_difference(still, planned)
    assert all(v <= 1e-6 for v in worst.values()), worst


def _resume_world(rank: int, world_size: int, tmp: str) -> dict:
    import largeep_plugin.hf as lhf

    out: dict = {}
    for move in (False, True):
        straight = _build(4)
        losses, _ = _steps(*straight, rank, range(6), move_at=1 if move else None)
        out[f"straight{move}"] = (losses[3:], _logical(straight[0], straight[1]))
        first = _build(4)
        _steps(*first, rank, range(3), move_at=1 if move else None)
        path = os.path.join(tmp, f"ckpt{move}")
        lhf.save_training_state(path, first[0], first[1], extra={"step": 3})
        out[f"pending{move}"] = sum(int(layer.tokens_per_expert_since_update.sum()) for _, layer in _layers(first[0]))
        resumed = _build(2, seed=7)   # other weights, EP 2 x 2 copies: everything comes from the save
        extra = lhf.load_training_state(path, resumed[0], resumed[1])
        losses, _ = _steps(*resumed, rank, range(extra["step"], 6))
        out[f"resumed{move}"] = (losses, _logical(resumed[0], resumed[1]))
    return out


def test_resume_at_another_ep_size_equals_the_run_that_never_stopped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    per_rank = world(_resume_world, WORLD, str(tmp_path), timeout=600.0)
    for move in (False, True):
        assert per_rank[0][f"pending{move}"] > 0   # the save fell between two bias updates
        want = (per_rank[0][f"straight{move}"][0], [r[f"straight{move}"][1] for r in per_rank])
        got = (per_rank[0][f"resumed{move}"][0], [r[f"resumed{move}"][1] for r in per_rank])
        worst = worst_difference(want, got)
        assert all(v <= 1e-6 for v in worst.values()), (move, worst)
