"""Hugging Face MoE models under ``largeep_plugin.integrations.deepspeed.engine.initialize`` (the ``"large_ep"``
section), 4 gloo ranks, tiny random-init models from ``hf_models.py``.

The reference is the same model unconverted under plain ``deepspeed.initialize`` with the same config minus the
section, the same tokens per rank (different on every rank: real data parallelism) and the same seed; the
balancing-bias rate is 0 for the parity runs so that routing cannot drift. Checked:
    * ZeRO 2, ten steps, Mixtral and DeepSeek-V3 (shared expert, group-limited routing, selection bias) at EP 4:
      the per-step mean loss equals the reference's to 1e-4; for three steps: gpt-oss (router and expert biases)
      and Qwen2-MoE (gated shared expert) under ZeRO 2, Mixtral under ZeRO 0 and 1 (EP 4) and ZeRO 3 (EP 2 x 2
      data-parallel copies: each expert partitioned over its two holders), 8 experts colocated two per rank
      (``allow_colocate``) under ZeRO 2; a placement passed to ``initialize`` with replicas (2 experts on 4 ranks,
      one rank holding both) under ZeRO 0 and 1 with unmanaged gradient accumulation (the replicas' gradients
      summed before the engine's step);
    * the bias (rate > 0, two gradient-accumulation micro-steps per step, EP 2 x 2 copies) stays put after a
      micro-step, moves after the real step, identically on every rank (counts summed over the copies); the
      monitor's JSONL file gets one record per step and layer, and TensorBoard the same imbalance per step;
    * checkpoint: two steps, ``engine.save_checkpoint``, a fresh engine built from other weights
      ``load_checkpoint``s it: every parameter and the bias equal, the next step's loss equal, one file per layer
      and expert (every rank's experts); the same with colocated experts, and under ZeRO 3 (EP 2 x 2 copies);
    * the section's placement (a 2 x 2 topology and a skewed load file): a permutation of the experts, the same
      losses, and checkpoint file ``layer_0_expert_<e>`` holds expert e whichever rank holds it;
    * optimizer groups built on the unconverted model follow the conversion (router and experts where the Hugging
      Face tensors they are read from were, experts split into DeepSpeed's MoE group; a tensor read from two
      groups is an error);
    * errors: a model-defining key in the section, more ranks than experts, colocation without the opt-in,
      replicas with managed gradient accumulation, a placement and the section's placement files (in the world); a misspelt section name and ``"expert_parallel"`` with ``"large_ep"`` (before any rank starts).
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from hf_models import tiny_model, tokens  # noqa: E402
from largeep_plugin.tools.launch import run_world  # noqa: E402

WORLD, BATCH, SEQ = 4, 2, 8


def _config(stage: int, large_ep: dict | None = None, gas: int = 1, unmanaged: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
    }
    if unmanaged:
        cfg["managed_gradient_accumulation"] = False
    if large_ep is not None:
        cfg["large_ep"] = large_ep
    return cfg


def _engine(family: str, experts: int, stage: int, large_ep: dict | None, seed: int = 0, gas: int = 1,
            placement=None, unmanaged: bool = False):
    from largeep_plugin.integrations.deepspeed.engine import initialize

    model = tiny_model(family, experts, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the colocation warning
        engine, *_ = initialize(model=model, model_parameters=list(model.parameters()),
                                config=_config(stage, large_ep, gas, unmanaged), placement=placement)
    return engine


def _replicated_placement():
    """2 experts on 4 ranks: expert 0 three times (rank 3 holds it beside expert 1), expert 1 twice."""
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Topology

    return Placement(topology=Topology.uniform(1, WORLD), num_experts=2, rank_to_experts=((0,), (0,), (1,), (0, 1)))


def _losses(engine, rank: int, steps: int, start: int = 0) -> list[float]:
    """Mean loss over the world per optimizer step; each rank's own tokens (the same batch every step, so the
    loss goes down)."""
    import torch.distributed as dist

    out = []
    for step in range(start, start + steps):
        total = torch.zeros(())
        for micro in range(engine.gradient_accumulation_steps()):
            ids = tokens(BATCH, SEQ, seed=100 * rank + micro)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        out.append(float(total) / dist.get_world_size() / engine.gradient_accumulation_steps())
    return out


def _parity(family: str, experts: int, stage: int, steps: int, section: dict, placement=None,
            unmanaged: bool = False) -> dict:
    reference = _losses(_engine(family, experts, stage, None, unmanaged=unmanaged), torch.distributed.get_rank(),
                        steps)
    engine = _engine(family, experts, stage, dict(section, load_balance={"bias_update_rate": 0.0}),
                     placement=placement, unmanaged=unmanaged)
    converted = _losses(engine, torch.distributed.get_rank(), steps)
    return {"reference": reference, "converted": converted, "moe_module": engine.has_moe_layers,
            "blocks": sorted({type(m).__name__ for m in engine.module.modules() if hasattr(m, "family")})}


def _state(engine) -> dict[str, torch.Tensor]:
    """Every parameter (whole, also under ZeRO 3) and buffer of the engine's model."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    params = list(engine.module.named_parameters())
    with GatheredParameters([p for _, p in params]):
        return {k: v.detach().clone() for k, v in params + list(engine.module.named_buffers())}


def _checkpoint(rank: int, ckpt_dir: str, experts: int, section: dict, stage: int = 2) -> dict:
    """Two steps, save; a fresh engine from other weights loads; compare every tensor and the next loss."""
    trained = _engine("mixtral", experts, stage, section)
    _losses(trained, rank, 2)
    trained.save_checkpoint(ckpt_dir, tag="t")
    saved = _state(trained)
    fresh = _engine("mixtral", experts, stage, section, seed=7)
    before = _state(fresh)
    fresh.load_checkpoint(ckpt_dir, tag="t")
    after = _state(fresh)
    return {
        "differs_before": sorted(k for k in saved if not torch.equal(before[k], saved[k])),
        "unequal_after": sorted(k for k in saved if not torch.equal(after[k], saved[k])),
        "bias_nonzero": any(bool(v.ne(0).any()) for k, v in saved.items() if k.endswith("expert_bias")),
        "next": (_losses(trained, rank, 1, start=2), _losses(fresh, rank, 1, start=2)),
        "files": sorted(os.listdir(os.path.join(ckpt_dir, "t"))) if rank == 0 else [],
    }


def _bias_steps(rank: int, world: int, jsonl: str, tensorboard_dir: str) -> dict:
    """Bias rate > 0, two micro-steps per optimizer step, EP 2 x 2 data-parallel copies (the counts must be summed
    over the copies for the bias to stay the same everywhere; 4 experts, two per rank): the bias after each
    micro-step."""
    from largeep_plugin.layer.moe_layer import moe_layers

    section = {"enabled": True, "ep_size": 2, "allow_colocate": True,
               "monitor": {"jsonl_path": jsonl, "tensorboard_dir": tensorboard_dir},
               "load_balance": {"bias_update_rate": 0.01}}
    engine = _engine("mixtral", 4, 2, section, gas=2)
    biases = []
    for micro in range(4):
        ids = tokens(BATCH, SEQ, seed=100 * rank + micro)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        mine = torch.stack([layer.router.expert_bias for _, layer in moe_layers(engine.module)])
        gathered = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)
        biases.append(gathered)
    return {"biases": biases, "steps": engine.global_steps}


def _placed(rank: int, ckpt_dir: str, files: dict) -> dict:
    """The section's placement files (2 nodes x 2 GPUs, two hot experts): parity, and the per-expert checkpoint
    file of expert e holds expert e whichever rank holds it."""
    engine = _engine("mixtral", WORLD, 2, {"enabled": True, "ep_size": "auto", "placement": files,
                                            "load_balance": {"bias_update_rate": 0.0}})
    out = {"reference": _losses(_engine("mixtral", WORLD, 2, None), rank, 3), "converted": _losses(engine, rank, 3)}
    engine.save_checkpoint(ckpt_dir, tag="p")
    moe = engine.module.model.layers[0].mlp.moe
    saved = torch.load(os.path.join(ckpt_dir, "p", f"layer_0_expert_{moe.expert_id}_mp_rank_00_model_states.pt"),
                       weights_only=False)
    on_disk = next(v for k, v in saved.items() if k.endswith(f"deepspeed_experts.{moe.expert_id}.fc1.weight"))
    return dict(out, expert_id=moe.expert_id, file_holds_it=torch.equal(on_disk, moe.expert.fc1.weight))


def _param_groups() -> dict:
    """Optimizer groups built on the unconverted model follow the conversion (no engine needed)."""
    from largeep_plugin.integrations.deepspeed.engine import _moe_param_groups, ensure_expert_groups
    from largeep_plugin.integrations.deepspeed.hf_blocks import convert_hf_blocks
    from largeep_plugin.integrations.section.config import parse_large_ep_section

    section = parse_large_ep_section({"enabled": True, "ep_size": WORLD})
    out = {}
    for family in ("mixtral", "deepseek_v3"):
        model = tiny_model(family, WORLD)
        named = list(model.named_parameters())
        # The MoE blocks' tensors in a group of their own learning rate; the shared expert's up projection apart.
        split = [n for n, _ in named if ".mlp." in n and not n.endswith("shared_experts.up_proj.weight")]
        groups = [{"params": [p for n, p in named if n in split], "lr": 0.5},
                  {"params": [p for n, p in named if n not in split]}]
        mapping, _ = convert_hf_blocks(model, section, {}, ensure_expert_groups(WORLD), None, 2)
        try:
            result = _moe_param_groups(groups, mapping, model)
        except ValueError as e:
            out[family] = str(e)
            continue
        names = {id(p): n for n, p in model.named_parameters()}
        out[family] = [(g.get("lr"), bool(g.get("moe")), sorted(names[id(p)].split(".", 3)[-1] for p in g["params"]))
                       for g in result]
        out[family + "_covered"] = sorted(id(p) for g in result for p in g["params"]) == sorted(names)
    return out


def _errors() -> dict[str, str]:
    out = {}
    cases = {
        "model_field": ("mixtral", WORLD, {"enabled": True, "ep_size": WORLD, "top_k": 1}),
        "replicas": ("mixtral", 2, {"enabled": True, "ep_size": WORLD}),
        "no_opt_in": ("mixtral", 8, {"enabled": True, "ep_size": WORLD}),
    }
    for name, (family, experts, section) in cases.items():
        try:
            _engine(family, experts, 2, section)
            out[name] = "no error"
        except (ValueError, NotImplementedError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    placed = {"managed_replicas": ({"enabled": True, "ep_size": WORLD}, False),
              "zero2_replicas": ({"enabled": True, "ep_size": WORLD}, True),
              "placement_and_files": ({"enabled": True, "ep_size": WORLD, "placement": {"load_file": "load.json"}},
                                      True)}
    for name, (section, unmanaged) in placed.items():
        try:
            _engine("mixtral", 2, 2, section, placement=_replicated_placement(), unmanaged=unmanaged)
            out[name] = "no error"
        except (ValueError, NotImplementedError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _world(rank: int, world: int, tmp: str, files: dict) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    auto = {"enabled": True, "ep_size": "auto"}
    out = {
        "mixtral_z2": _parity("mixtral", WORLD, 2, 10, auto),
        "deepseek_z2": _parity("deepseek_v3", WORLD, 2, 10, auto),
        "gpt_oss_z2": _parity("gpt_oss", WORLD, 2, 3, auto),
        "qwen2_moe_z2": _parity("qwen2_moe", WORLD, 2, 3, auto),
        "mixtral_z0": _parity("mixtral", WORLD, 0, 3, auto),
        "mixtral_z1": _parity("mixtral", WORLD, 1, 3, auto),
        "mixtral_z3_copies": _parity("mixtral", 2, 3, 3, auto),  # EP 2, two data-parallel copies
        "colocated_z2": _parity("mixtral", 8, 2, 3, dict(auto, ep_size=WORLD, allow_colocate=True)),
        "replicas_z1": _parity("mixtral", 2, 1, 3, dict(auto, ep_size=WORLD), _replicated_placement(), True),
        "replicas_z0": _parity("mixtral", 2, 0, 3, dict(auto, ep_size=WORLD), _replicated_placement(), True),
    }
    out["placed"] = _placed(rank, os.path.join(tmp, "ckpt_placed"), files)
    out["errors"] = _errors()
    out["param_groups"] = _param_groups()
    out["bias"] = _bias_steps(rank, world, os.path.join(tmp, "load.jsonl"), os.path.join(tmp, "tb"))
    rate = {"load_balance": {"bias_update_rate": 0.01}}
    out["ckpt"] = _checkpoint(rank, os.path.join(tmp, "ckpt"), WORLD, dict(auto, **rate))
    out["ckpt_colocated"] = _checkpoint(rank, os.path.join(tmp, "ckpt8"), 8,
                                        dict(auto, ep_size=WORLD, allow_colocate=True, **rate))
    # ZeRO 3, EP 2 x 2 copies, two experts per rank: each expert partitioned over its two holders.
    out["ckpt_z3"] = _checkpoint(rank, os.path.join(tmp, "ckpt_z3"), WORLD,
                                 dict(auto, ep_size=2, allow_colocate=True, **rate), stage=3)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import transformers  # noqa: F401  (imported once here, not once per forked rank)
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    tmp = tmp_path_factory.mktemp("hf_ds")
    (tmp / "topology.yaml").write_text(
        "name: synthetic\nnodes: 2\ngpus_per_node: 2\ngpu_memory_gib: 80\n"
        "intra_node: {bandwidth_gbytes_per_s: 450, latency_us: 1}\n"
        "inter_node: {bandwidth_gbytes_per_s: 50, latency_us: 5}\n")
    (tmp / "load.json").write_text(json.dumps({"tokens_per_expert": [10, 9, 1, 1]}))
    files = {"topology_file": str(tmp / "topology.yaml"), "load_file": str(tmp / "load.json")}
    tmp = str(tmp)
    out = run_world(_world, WORLD, args=(tmp, files), timeout=600)
    out[0]["tmp"] = tmp
    return out


@pytest.mark.parametrize("case", ["mixtral_z2", "deepseek_z2", "gpt_oss_z2", "qwen2_moe_z2", "mixtral_z0",
                                  "mixtral_z1", "mixtral_z3_copies", "colocated_z2", "replicas_z0", "replicas_z1"])
def test_losses_equal_the_unconverted_model(results, case):
    r = results[0][case]
    ref, conv = r["reference"], r["converted"]
    assert max(abs(a - b) for a, b in zip(ref, conv)) < 1e-4, (ref, conv)
    assert conv[-1] < conv[0] - 0.05, conv  # it trains
    # Stages 0-2: the blocks are DeepSpeed MoE modules; stage 3 refuses those and sees tagged parameters instead.
    stage3 = case.endswith("z3_copies")
    assert r["moe_module"] is not stage3
    assert r["blocks"] == ["LargeEPHFBlock" if stage3 else "LargeEPDeepSpeedHFBlock"]


def test_placement_from_the_section(results):
    r = results[0]["placed"]
    assert max(abs(a - b) for a, b in zip(r["reference"], r["converted"])) < 1e-4, r
    held = [res["placed"]["expert_id"] for res in results]
    assert sorted(held) == list(range(WORLD)) and held != list(range(WORLD)), held  # a real permutation
    assert all(res["placed"]["file_holds_it"] for res in results)


def test_bias_moves_after_real_steps_only_and_the_same_everywhere(results):
    biases = results[0]["bias"]["biases"]  # [micro-step][rank] -> [layers, E]
    assert results[0]["bias"]["steps"] == 2
    for per_rank in biases:
        assert all(torch.equal(b, per_rank[0]) for b in per_rank)
    zero = torch.zeros_like(biases[0][0])
    assert torch.equal(biases[0][0], zero)              # micro-step: no optimizer step, no bias step
    assert not torch.equal(biases[1][0], zero)          # the real step moved it
    assert torch.equal(biases[2][0], biases[1][0])      # micro-step again
    assert not torch.equal(biases[3][0], biases[2][0])
    with open(os.path.join(results[0]["tmp"], "load.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["layer"]) for r in records] == [(s, f"model.layers.{i}.mlp.moe") for s in (1, 2)
                                                          for i in (0, 1)]
    # The tokens of the step's last micro-batch on rank 0's EP group (2 ranks), top 2 each.
    assert all(sum(r["counts"]) == 2 * BATCH * SEQ * 2 for r in records)
    # TensorBoard (rank 0 writes): each layer's imbalance and drops at each real step, as in the JSONL records.
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(os.path.join(results[0]["tmp"], "tb"))
    events.Reload()
    for r in records:
        tag = f"large_ep/{r['layer']}/imbalance"
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got[r["step"]] == pytest.approx(r["imbalance"], rel=1e-6), (tag, got, r)
        assert {e.step for e in events.Scalars(f"large_ep/{r['layer']}/drops")} == {1, 2}


@pytest.mark.parametrize("case,experts", [("ckpt", WORLD), ("ckpt_colocated", 8), ("ckpt_z3", WORLD)])
def test_checkpoint_round_trip(results, case, experts):
    for r in results:
        c = r[case]
        assert c["bias_nonzero"]
        assert any(".moe.expert" in k for k in c["differs_before"]) and c["unequal_after"] == [], c
        assert c["next"][0] == pytest.approx(c["next"][1], abs=1e-6)
    files = results[0][case]["files"]
    if case == "ckpt_z3":  # the engine sees no MoE module: every rank's shard (experts included) in its own file
        assert sum(f.endswith("_optim_states.pt") and f.startswith("zero_pp_rank_") for f in files) == WORLD
        return
    for layer in range(2):
        assert [e for e in range(experts) if f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" in files] == \
            list(range(experts))


def test_parameter_groups_follow_the_conversion(results):
    r = results[0]["param_groups"]
    assert r["mixtral_covered"]
    (lr_a, moe_a, a), (lr_b, moe_b, b), (lr_e, moe_e, e) = r["mixtral"]
    # Router and layer norms stay where the Hugging Face router was; the experts split off into the MoE group
    # with the learning rate of the group that held experts.gate_up_proj / down_proj.
    assert (lr_a, moe_a, lr_b, moe_b, lr_e, moe_e) == (0.5, False, None, False, 0.5, True)
    assert set(a) == {"mlp.moe.router.weight"} and len(a) == 2  # two layers
    assert sorted(set(e)) == ["mlp.moe.expert.fc1.weight", "mlp.moe.expert.fc2.weight"] and len(e) == 4
    assert not any(n.startswith("mlp.") for n in b)
    # DeepSeek's shared expert: gate and up projections become one tensor, but the groups split them.
    assert r["deepseek_v3"].startswith("parameter groups 0 and 1 both hold a tensor"), r["deepseek_v3"]


def test_errors_in_the_world(results):
    errors = results[0]["errors"]
    assert errors["model_field"].startswith("ValueError: large_ep.top_k=1: the Hugging Face model (Mixtral) "
                                            "defines top_k"), errors
    assert errors["replicas"].startswith("NotImplementedError: 2 experts per block on large_ep.ep_size=4"), errors
    assert "allow_colocate" in errors["no_opt_in"] and errors["no_opt_in"].startswith("ValueError"), errors
    assert errors["managed_replicas"].startswith("NotImplementedError: a placement with replicas under DeepSpeed "
                                                 "needs \"managed_gradient_accumulation\": false"), errors
    assert "the config has stage 2, managed_gradient_accumulation false" in errors["zero2_replicas"], errors
    assert errors["placement_and_files"].startswith("ValueError: initialize got a placement and large_ep.placement "
                                                    "{'load_file': 'load.json'}"), errors


@pytest.mark.parametrize("key", ["large-ep", "largeep", "large_EP", "larg_ep"])
def test_misspelt_section_is_an_error(key):
    from largeep_plugin.integrations.deepspeed.engine import initialize

    with pytest.raises(ValueError, match=f"top-level key '{key}': did you mean 'large_ep'"):
        initialize(model=torch.nn.Linear(2, 2), config=dict(_config(2), **{key: {"enabled": True, "ep_size": 4}}))


def test_autoep_and_large_ep_together_is_an_error():
    from largeep_plugin.integrations.deepspeed.engine import initialize

    config = dict(_config(2, {"enabled": True, "ep_size": 4}), expert_parallel={"enabled": True, "autoep_size": 4})
    with pytest.raises(ValueError, match="enables both 'expert_parallel'"):
        initialize(model=torch.nn.Linear(2, 2), config=config)
    # DeepSpeed's own keys never count as a misspelling, and a disabled AutoEP section is fine.
    from largeep_plugin.integrations.deepspeed.engine import large_ep_section

    fine = dict(_config(2, {"enabled": True, "ep_size": 4}), expert_parallel={"enabled": False})
    assert large_ep_section(config=fine).enabled
