"""Resume a Megatron-Core run at another EP size with its optimizer state: the next steps equal the run that never
stopped.

A 2-layer GPTModel with large-EP layers trains with Megatron's optimizer (``megatron_helpers.megatron_adam``:
Megatron's parameter groups, torch Adam, ``FP32Optimizer`` for the dense and the expert-parallel parameters,
chained), Megatron's ``finalize_model_grads`` over ``GlooDataParallel``, and the plugin's bias update after every
step (softmax routing, ``bias_update_rate``: the bias moves every step). After 3 steps the model and the optimizer
go through Megatron's ``dist_checkpointing.save`` (``model.sharded_state_dict()``,
``optimizer.sharded_state_dict(model_sd)``; on CPU with ``megatron_helpers.files_strategy``) and the run goes on
3 more steps: the oracle. A model built at another EP size loads both (``optimizer.sharded_state_dict(model_sd,
is_loading=True)``, ``dist_checkpointing.load``, ``load_state_dict``) and trains the same 3 steps on the same global
batches (24 sequences, split over however many ranks there are):

    4 experts, EP 4 -> EP 2    colocated: two experts per rank, two data-parallel copies    (world 4)
                               (the EP 4 run moved its experts to the mirrored ranks after step 1)
    4 experts, EP 4 -> EP 8    replicas: each expert on two ranks of the EP group           (world 8)
    8 experts, EP 8 -> EP 6    colocated, not dividing: 2, 2, 1, 1, 1, 1 experts per rank    (world 6)
    4 experts, EP 4 -> EP 2    with dynamic replicas (one spare slot per rank): the clones' load history is in the
                               checkpoint, their plan (per EP size) is not; the resumed run plans them from it

Checked: per-step losses equal (1e-6), every expert's Adam moments and step count after loading equal the saved
ones by global expert id, and the selection bias equals the saved one (and moved from 0). Also refused: a
checkpoint written for the distributed optimizer's per-buffer formats (``distrib_optim_sharding_type``
'dp_reshardable') loaded into another EP layout (NotImplementedError naming the format and both layouts); the same
layout loads.
"""
from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import world  # noqa: E402
from megatron_helpers import (  # noqa: E402
    Replicated, colocated_placement, dist_load, dist_save, init_megatron, megatron_adam, megatron_step, tiny_config,
    tiny_gpt, tokens,
)

VOCAB, SEQ, GLOBAL_BATCH, LR, BEFORE, AFTER = 32, 8, 24, 1e-2, 3, 3


def _placement(experts: int, ep: int) -> Any:
    if ep > experts:
        return Replicated(experts, ep)
    return colocated_placement(experts, ep) if ep < experts else None


def _build(experts: int, ep: int, spare: int = 0) -> tuple[Any, Any, Any, Any]:
    from largeep_plugin.integrations.megatron import GlooDataParallel, install_bias_update_hook

    init_megatron(ep=ep)
    cfg = tiny_config(num_layers=2, num_moe_experts=experts)
    large_ep = {"init_seed": 0, "bias_update_rate": 0.05, "dynamic_replicas": spare}
    model = tiny_gpt(cfg, seed=0, vocab=VOCAB, seq=SEQ, large_ep=large_ep, placement=_placement(experts, ep))
    ddp = GlooDataParallel(cfg, model)
    optimizer = megatron_adam(model, LR)
    install_bias_update_hook(model, optimizer)
    return cfg, model, ddp, optimizer


def _step(model: Any, ddp: Any, optimizer: Any, step: int) -> float:
    """One step on this rank's share of the global batch of ``step``; the global mean loss."""
    from megatron.core.distributed import finalize_model_grads

    rank, size = dist.get_rank(), dist.get_world_size()
    ids, pos = tokens(GLOBAL_BATCH, SEQ, VOCAB, seed=100 + step)
    share = slice(rank * GLOBAL_BATCH // size, (rank + 1) * GLOBAL_BATCH // size)
    ddp.zero_grad_buffer()
    loss = ddp(ids[share], pos[share], None, labels=ids[share]).float().mean()
    loss.backward()
    finalize_model_grads([ddp])
    megatron_step(optimizer)  # the hook: bias update
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / size


def _expert_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """By (layer, global expert id): fc1's weight and Adam state; by layer: the selection bias."""
    from largeep_plugin.integrations.megatron import large_ep_moe_layers

    states = {}
    for opt in optimizer.chained_optimizers:
        states.update(opt.optimizer.state)
    out: dict[str, Any] = {}
    for name, layer in large_ep_moe_layers(model):
        out[f"{name}.bias"] = layer.router.expert_bias.detach().clone()
        for e, module in layer.experts.experts_by_id():
            p = module.fc1.weight
            st = states[p]
            out[f"{name}.{e}"] = {"weight": p.detach().clone(), "exp_avg": st["exp_avg"].clone(),
                                  "exp_avg_sq": st["exp_avg_sq"].clone(), "step": float(st["step"])}
    return out


def _save(model: Any, optimizer: Any, directory: str) -> None:
    model_sd = model.sharded_state_dict()
    dist_save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, directory)


def _load(model: Any, optimizer: Any, directory: str) -> list[str]:
    model_sd = model.sharded_state_dict()
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_load(sharded, directory)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    optimizer.load_state_dict(loaded["optimizer"])
    return [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)


def _reference(experts: int, ep: int, directory: str, move: bool = False, spare: int = 0) -> dict[str, Any]:
    """BEFORE steps, save, AFTER steps: the run that never stopped. ``move``: after the first step every layer's
    experts go to the mirrored EP rank (``largeep_plugin.move_experts``), so the save holds a moved layout."""
    import largeep_plugin as lep
    from largeep_plugin.integrations.megatron import MegatronOptimizerState, large_ep_moe_layers

    _, model, ddp, optimizer = _build(experts, ep, spare)
    losses = [_step(model, ddp, optimizer, 0)]
    if move:
        for _, layer in large_ep_moe_layers(model):
            home = layer.home_layout()
            lep.move_experts(layer, home[::-1], MegatronOptimizerState(optimizer))
    losses += [_step(model, ddp, optimizer, s) for s in range(1, BEFORE)]
    _save(model, optimizer, directory)
    saved = _expert_state(model, optimizer)
    losses += [_step(model, ddp, optimizer, s) for s in range(BEFORE, BEFORE + AFTER)]
    return {"losses": losses, "saved": saved, "home": [list(h) for h in model.decoder.layers[0].mlp.home_layout()]}


def _resumed(experts: int, ep: int, directory: str, spare: int = 0) -> dict[str, Any]:
    """A model built at EP ``ep`` loads the checkpoint and trains the AFTER steps."""
    _, model, ddp, optimizer = _build(experts, ep, spare)
    problems = _load(model, optimizer, directory)
    loaded = _expert_state(model, optimizer)
    layer = model.decoder.layers[0].mlp
    clones = layer.clones.plan.num_clones if layer.clones is not None else 0   # planned from the saved history
    losses = [_step(model, ddp, optimizer, s) for s in range(BEFORE, BEFORE + AFTER)]
    return {"losses": losses, "loaded": loaded, "problems": problems, "expert_ids": list(layer.expert_ids),
            "clones": clones}


def _refusal(rank: int, directory: str) -> dict[str, str]:
    """A 'dp_reshardable' checkpoint: the same layout loads, another is refused."""
    from megatron.core import dist_checkpointing

    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    _, model, _, _ = _build(4, 4)
    dist_save(model.sharded_state_dict(metadata=metadata), directory, content_metadata=metadata)
    out = {}
    for ep in (4, 2):
        _, model, _, _ = _build(4, ep)
        saved_metadata = dist_checkpointing.load_content_metadata(directory)  # as Megatron-LM's load does
        try:
            model.load_state_dict(dist_load(model.sharded_state_dict(metadata=saved_metadata), directory),
                                  strict=False)
            out[f"ep{ep}"] = "loaded"
        except NotImplementedError as err:
            out[f"ep{ep}"] = str(err)
    return out


def _world4(rank: int, size: int, root: str) -> dict[str, Any]:
    return {"ref_4": _reference(4, 4, os.path.join(root, "e4_ep4"), move=True),
            "4_to_2": _resumed(4, 2, os.path.join(root, "e4_ep4")),
            "ref_4_clones": _reference(4, 4, os.path.join(root, "e4_ep4_clones"), spare=1),
            "4_to_2_clones": _resumed(4, 2, os.path.join(root, "e4_ep4_clones"), spare=1),
            "refusal": _refusal(rank, os.path.join(root, "layout"))}


def _world8(rank: int, size: int, root: str) -> dict[str, Any]:
    return {"4_to_8": _resumed(4, 8, os.path.join(root, "e4_ep4")),
            "ref_8": _reference(8, 8, os.path.join(root, "e8_ep8"))}


def _world6(rank: int, size: int, root: str) -> dict[str, Any]:
    return {"8_to_6": _resumed(8, 6, os.path.join(root, "e8_ep8"))}


@pytest.fixture(scope="module")
def results(tmp_path_factory: Any) -> dict[str, list[dict[str, Any]]]:
    import warnings

    warnings.filterwarnings("ignore")
    root = tmp_path_factory.mktemp("megatron_resume")
    for sub in ("e4_ep4", "e4_ep4_clones", "e8_ep8", "layout"):
        (root / sub).mkdir()
    out = {"w4": world(_world4, 4, str(root), timeout=400.0)}
    out["w8"] = world(_world8, 8, str(root), timeout=500.0)
    out["w6"] = world(_world6, 6, str(root), timeout=400.0)
    return out


# case: (world of the oracle, its key, world of the resumed run, the experts each resumed rank holds, tolerance)
CASES = {
    "4_to_2": ("w4", "ref_4", "w4", [[0, 1], [2, 3], [0, 1], [2, 3]], 1e-6),
    "4_to_8": ("w4", "ref_4", "w8", [[r % 4] for r in range(8)], 1e-6),
    "8_to_6": ("w8", "ref_8", "w6", [[0, 1], [2, 3], [4], [5], [6], [7]], 1e-6),
    # Dynamic replicas: the clones are planned afresh for EP 2 from the saved load history, so their gradients join
    # the homes' in another order than in the oracle's (1e-5, as in tests/test_megatron_dynamic_replicas.py).
    "4_to_2_clones": ("w4", "ref_4_clones", "w4", [[0, 1], [2, 3], [0, 1], [2, 3]], 1e-5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_at_another_ep_size_equals_the_run_that_never_stopped(results: Any, case: str) -> None:
    ref_world, ref_key, world_key, held, tol = CASES[case]
    ref = results[ref_world][0][ref_key]
    resumed = [r[case] for r in results[world_key]]
    if ref_key == "ref_4":
        assert ref["home"] == [[3], [2], [1], [0]], ref["home"]   # saved after a move
    assert [r["expert_ids"] for r in resumed] == held, [r["expert_ids"] for r in resumed]
    assert all(not r["problems"] for r in resumed), resumed[0]["problems"]
    want = ref["losses"][BEFORE:]
    for rank, r in enumerate(resumed):
        err = max(abs(a - b) for a, b in zip(r["losses"], want))
        assert err <= tol, f"{case}, rank {rank}: losses {r['losses']} != {want} (never stopped)"
        assert r["clones"] > 0 if case.endswith("_clones") else r["clones"] == 0, (case, rank, r["clones"])
    # Every expert's optimizer state followed its global id (the oracle's ranks together held every expert).
    saved = {k: v for r in results[ref_world] for k, v in r[ref_key]["saved"].items()}
    for rank, r in enumerate(resumed):
        for key, got in r["loaded"].items():
            if key.endswith(".bias"):
                assert torch.equal(got, saved[key]) and float(got.abs().max()) > 0, (case, rank, key)
                continue
            for field in ("weight", "exp_avg", "exp_avg_sq"):
                assert torch.equal(got[field], saved[key][field]), (case, rank, key, field)
            assert got["step"] == saved[key]["step"] == BEFORE, (case, rank, key, got["step"])


def test_per_buffer_optimizer_formats_refuse_another_layout(results: Any) -> None:
    refusal = results["w4"][0]["refusal"]
    assert refusal["ep4"] == "loaded", refusal
    message = refusal["ep2"]
    assert "distrib_optim_sharding_type='dp_reshardable'" in message and "EP size 4" in message, message
    assert "EP size 2" in message and "[[0, 1], [2, 3]]" in message, message
