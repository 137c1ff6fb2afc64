"""DeepSpeed engine with converted layers, ZeRO stage 1 at EP 4 on 4 gloo ranks:
20 training steps where the loss goes down and matches the stock model's under identical routing; checkpoint
save/load through the engine round-trips (per-expert files included); the bias update runs after each step and
the monitor writes its records; "ep_size": "auto" resolves to the world (logged once, by rank 0) and a size that
cannot fit the world is an error naming the field. One world runs every check."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from largeep_plugin.tools.launch import run_world  # noqa: E402
from largeep_plugin.models.synthetic import MarkovChainData  # noqa: E402
from largeep_plugin.models.tiny_moe import TinyMoEConfig  # noqa: E402

WORLD, STEPS, LAYERS = 4, 20, 2
MODEL = TinyMoEConfig(vocab_size=32, hidden_size=32, ffn_hidden_size=48, num_layers=LAYERS, num_heads=2, seq_len=16,
                      num_experts=WORLD, top_k=2, seed=3)
BATCH = 4


def _config(large_ep: dict | None, stage: int = 1) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "reduce_scatter": True},
        "steps_per_print": 10**9,
    }
    if large_ep is not None:
        cfg["large_ep"] = large_ep
    return cfg


def _engine(large_ep: dict | None, seed: int = MODEL.seed, stage: int = 1):
    from largeep_plugin.integrations.deepspeed.engine import initialize
    from largeep_plugin.integrations.deepspeed.stock import stock_moe_factory
    from largeep_plugin.models.tiny_moe import TinyMoETransformer
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = TinyMoETransformer(dataclasses.replace(MODEL, seed=seed), stock_moe_factory(MODEL, WORLD, attach_groups=False))
    # As a stock DeepSpeed MoE script does it: groups split on the stock model, before initialize.
    params = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, *_ = initialize(model=model, model_parameters=params, config=_config(large_ep, stage))
    return engine


def _train(engine, rank: int, steps: int, start: int = 0) -> list[float]:
    import torch.distributed as dist

    data = MarkovChainData(MODEL.vocab_size, branching=2, seed=5)
    losses = []
    for step in range(start, start + steps):
        tokens, targets = data.batch(BATCH, MODEL.seq_len, rank=rank, step=step)
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses


def _world(rank: int, world: int, ckpt_dir: str) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm
    from largeep_plugin.layer.moe_layer import moe_layers

    init_deepspeed_comm()
    out: dict = {}
    # Identical routing: no balancing bias (the stock gate has none), dropless on both sides.
    same_routing = {"enabled": True, "ep_size": WORLD, "load_balance": {"bias_update_rate": 0.0}}
    out["stock"] = _train(_engine(None), rank, STEPS)
    converted = _engine(same_routing)
    out["converted"] = _train(converted, rank, STEPS)
    out["converted_types"] = sorted({type(block.moe).__name__ for block in converted.module.moe_blocks()})
    out["zero_stage"] = converted.zero_optimization_stage()

    # Checkpoint: save, train on; a fresh engine from other weights loads the checkpoint and must train on the same.
    converted.save_checkpoint(ckpt_dir, tag="t")
    saved = {k: v.clone() for k, v in converted.module.state_dict().items()}
    out["continued"] = _train(converted, rank, 2, start=STEPS)
    fresh = _engine(same_routing, seed=99)
    out["differs_before_load"] = any(
        not torch.equal(v, saved[k]) for k, v in fresh.module.state_dict().items() if k in saved
    )
    fresh.load_checkpoint(ckpt_dir, tag="t")
    out["equal_after_load"] = all(torch.equal(v, saved[k]) for k, v in fresh.module.state_dict().items())
    out["resumed"] = _train(fresh, rank, 2, start=STEPS)
    out["files"] = sorted(os.listdir(os.path.join(ckpt_dir, "t"))) if rank == 0 else None

    # The balancing bias moves after each optimizer step, identically on every rank; the monitor logs each step.
    # "auto": the EP size is the world's (4 experts, one per rank), said once by rank 0.
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        balancing = _engine({"enabled": True, "ep_size": "auto", "load_balance": {"bias_update_rate": 0.01},
                             "monitor": {"jsonl_path": os.path.join(ckpt_dir, "load.jsonl")}}, stage=2)
    out["auto_log"] = [line for line in log.getvalue().splitlines() if "ep_size" in line]
    out["auto_ep"] = (balancing.large_ep_section.ep_size, type(balancing.module.moe_blocks()[0].moe).__name__)
    out["bad"] = {}
    for name, section in (("too_big", {"enabled": True, "ep_size": 16}),
                          ("copies", {"enabled": True, "ep_size": "auto", "data_parallel_copies": 3})):
        try:  # refused on every rank before any group exists
            _engine(section)
            out["bad"][name] = "no error"
        except ValueError as e:
            out["bad"][name] = str(e)
    _train(balancing, rank, 3)
    biases = torch.stack([layer.router.expert_bias for _, layer in moe_layers(balancing.module)])
    gathered = [torch.empty_like(biases) for _ in range(world)]
    torch.distributed.all_gather(gathered, biases)
    out["bias_nonzero"] = bool(biases.abs().sum() > 0)
    out["bias_same_everywhere"] = all(torch.equal(g, biases) for g in gathered)
    out["bias_steps"] = float(biases.abs().max() / 0.01)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()  # imports DeepSpeed and loads its CPU op once here, not once per forked rank

    ckpt_dir = str(tmp_path_factory.mktemp("ckpt"))
    out = run_world(_world, WORLD, args=(ckpt_dir,), timeout=400)
    for r in out:
        r["ckpt_dir"] = ckpt_dir
    return out


def test_loss_goes_down_and_matches_stock(results):
    r = results[0]
    stock, conv = r["stock"], r["converted"]
    assert r["converted_types"] == ["LargeEPDeepSpeedMoE"] and r["zero_stage"] == 1
    assert sum(conv[-3:]) / 3 < sum(conv[:3]) / 3 - 0.3
    # Same weights, same tokens, same routing: the curves agree to float rounding amplified over 20 Adam steps.
    assert max(abs(a - b) for a, b in zip(stock, conv)) < 1e-4, (stock, conv)


def test_checkpoint_round_trip(results):
    for r in results:
        assert r["differs_before_load"] and r["equal_after_load"]
        assert r["resumed"] == pytest.approx(r["continued"], abs=1e-6)
    files = results[0]["files"]
    for layer in range(LAYERS):
        for expert in range(WORLD):
            assert f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" in files
    assert sum(f.startswith("zero_pp_rank_") for f in files) == WORLD


def test_bias_update_after_each_step_and_monitor(results):
    for r in results:
        assert r["bias_nonzero"] and r["bias_same_everywhere"]
        # Three steps of +-rate at most (sign updates), and at least one full step somewhere.
        assert 1.0 - 1e-6 <= results[0]["bias_steps"] <= 3.0 + 1e-6
    path = os.path.join(results[0]["ckpt_dir"], "load.jsonl")  # this world's file, not another test's
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f.read().splitlines()]
    assert [rec["step"] for rec in records] == [1, 1, 2, 2, 3, 3]  # one record per layer per step
    assert all(sum(rec["counts"]) == WORLD * BATCH * MODEL.seq_len * 2 for rec in records)


def test_auto_ep_size_and_sizes_the_world_cannot_hold(results):
    for rank, r in enumerate(results):
        assert r["auto_ep"] == (WORLD, "LargeEPDeepSpeedMoE"), r["auto_ep"]
        expected = ['largeep: large_ep.ep_size="auto" -> 4 (world size 4, data-parallel copies 1)'] if rank == 0 else []
        assert r["auto_log"] == expected, r["auto_log"]
        assert r["bad"]["too_big"] == "large_ep.ep_size=16 must divide the world size 4", r["bad"]
        assert r["bad"]["copies"].startswith("large_ep.data_parallel_copies=3 must divide the world size 4"), r["bad"]
