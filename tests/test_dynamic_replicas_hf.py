"""Dynamic replicas on the Hugging Face routes: tiny Mixtral and DeepSeek-V3 with a skewed router (two hot
experts: ``hf_models.skew_router``), ``dynamic_replicas=1`` re-planned every step, against the unconverted model.

    * torchrun (plain PyTorch): ``convert_model(..., dynamic_replicas=1)``, ``allreduce_gradients``, AdamW,
      ``largeep_plugin.rebalance(model)`` after every step; the reference is the unconverted model trained in
      each rank on the concatenated batch of all ranks;
    * DeepSpeed: ``initialize`` with ``"large_ep": {"dynamic_replicas": 1}`` under ZeRO 1, 2 and 3 (ZeRO 2 moves
      gradients into its buckets during backward: the clones' gradients must be home by then), the engine calling
      ``rebalance`` after each step; the reference is plain ``deepspeed.initialize`` on the unconverted model.
Ten steps each; the per-step mean loss equals the reference's to 1e-5. The clones are used (the plan holds some
after the first step, and the busiest rank is lighter than on the first step, which had none), and the JSONL
monitor records the re-plans.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from hf_models import skew_router, tiny_model, tokens  # noqa: E402
from largeep_plugin.tools.launch import run_world  # noqa: E402

WORLD, BATCH, SEQ, STEPS, LR = 4, 2, 8, 10, 3e-3
FAMILIES = ("mixtral", "deepseek_v3")


def _model(family: str):  # type: ignore[no-untyped-def]
    return skew_router(tiny_model(family, WORLD))


def _batch(step: int, rank: int) -> torch.Tensor:
    """Each rank's tokens, the same every step (so the loss goes down)."""
    return tokens(BATCH, SEQ, seed=100 + rank)


def _balance(model) -> dict:  # type: ignore[no-untyped-def]
    from largeep_plugin.layer.moe_layer import moe_layers

    layers = [layer for _, layer in moe_layers(model)]
    return {"rank_imbalance": max(layer.last_stats.rank_imbalance for layer in layers),
            "clones": sum(layer.clones.plan.num_clones for layer in layers)}


def _torchrun(rank: int, family: str) -> dict:
    import torch.distributed as dist

    import largeep_plugin as lep
    from largeep_plugin.hf import convert_model

    model = convert_model(_model(family), dynamic_replicas=1, rebalance_decay=0.0, bias_update_rate=0.0).train()
    ref = _model(family).train()
    opt, ref_opt = torch.optim.AdamW(model.parameters(), lr=LR), torch.optim.AdamW(ref.parameters(), lr=LR)
    out: dict = {"converted": [], "reference": [], "balance": []}
    for step in range(STEPS):
        ids = _batch(step, rank)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        lep.allreduce_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["balance"].append(_balance(model))
        lep.rebalance(model)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out["converted"].append(float(mean) / WORLD)
        every = torch.cat([_batch(step, r) for r in range(WORLD)])
        ref_loss = ref(input_ids=every, labels=every).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        out["reference"].append(float(ref_loss.detach()))
    return out


def _ds_config(stage: int, large_ep: dict | None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
           "zero_optimization": {"stage": stage}}
    if large_ep is not None:
        cfg["large_ep"] = large_ep
    return cfg


def _deepspeed(rank: int, family: str, stage: int, jsonl: str) -> dict:
    import torch.distributed as dist

    from largeep_plugin.integrations.deepspeed.engine import initialize

    section = {"enabled": True, "ep_size": WORLD, "dynamic_replicas": 1, "rebalance_decay": 0.0,
               "load_balance": {"bias_update_rate": 0.0}, "monitor": {"jsonl_path": jsonl}}
    out: dict = {}
    for name, large_ep in (("reference", None), ("converted", section)):
        model = _model(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine, *_ = initialize(model=model, model_parameters=list(model.parameters()),
                                    config=_ds_config(stage, large_ep))
        losses, balance = [], []
        for step in range(STEPS):
            ids = _batch(step, rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            if large_ep is not None:
                balance.append(_balance(engine.module))
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / WORLD)
        out[name] = losses
        if large_ep is not None:
            out["balance"] = balance
    return out


def _world(rank: int, world: int, tmp: str) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    out = {}
    for family in FAMILIES:
        out[f"{family} torchrun"] = _torchrun(rank, family)
    for family, stage in (("mixtral", 1), ("mixtral", 2), ("deepseek_v3", 2), ("mixtral", 3), ("deepseek_v3", 3)):
        out[f"{family} zero{stage}"] = _deepspeed(rank, family, stage, os.path.join(tmp, f"{family}{stage}.jsonl"))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import transformers  # noqa: F401  (imported once here, not once per forked rank)
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    tmp = str(tmp_path_factory.mktemp("dyn_hf"))
    out = run_world(_world, WORLD, args=(tmp,), timeout=900)
    out[0]["tmp"] = tmp
    return out


CASES = ["mixtral torchrun", "deepseek_v3 torchrun", "mixtral zero1", "mixtral zero2", "deepseek_v3 zero2",
         "mixtral zero3", "deepseek_v3 zero3"]


@pytest.mark.parametrize("case", CASES)
def test_losses_track_the_unconverted_model(results, case) -> None:
    r = results[0][case]
    ref, conv = r["reference"], r["converted"]
    assert max(abs(a - b) for a, b in zip(ref, conv)) < 1e-5, (ref, conv)
    assert conv[-1] < conv[0] - 0.05, conv  # it trains
    balance = r["balance"]
    assert balance[0]["clones"] == 0 and all(b["clones"] > 0 for b in balance[1:]), balance
    # The skew is real (the first step, without clones), and on average the clones take the busiest rank's load
    # off it (the plan follows the previous step's load, and a tiny model's routing still moves between steps).
    assert balance[0]["rank_imbalance"] >= 1.5, balance[0]
    later = [b["rank_imbalance"] for b in balance[2:]]
    assert sum(later) / len(later) < balance[0]["rank_imbalance"] - 0.2, balance


def test_the_monitor_records_the_replans(results) -> None:
    path = os.path.join(results[0]["tmp"], "mixtral2.jsonl")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    replans = [r for r in records if "replan" in r]
    stats = [r for r in records if "replan" not in r]
    assert replans and replans[0]["step"] == 1 and replans[0]["replan"]["changed"], replans[:1]
    assert all("rows_per_rank" in r and r["rank_imbalance"] >= 1.0 for r in stats), stats[:1]
    assert {r["layer"] for r in replans} == {"model.layers.0.mlp.moe", "model.layers.1.mlp.moe"}
