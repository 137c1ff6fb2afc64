"""Experts that move with their state under DeepSpeed (``integrations/deepspeed/training_state.py``): live
re-placement and resume at another EP size, on a tiny Hugging Face Mixtral (4 or 8 experts, 2 layers) converted by
``initialize`` with the ``"large_ep"`` section, Adam (torch's AdamW in the engine), a balancing bias updated every
step. The oracle is the run that neither moved nor stopped, on the same global batches (split over the ranks):
    * moves at EP 4 under ZeRO 1 and 2: ``lep.move_experts`` with ``DeepSpeedState(engine)`` (expert r to rank 3 - r,
      every layer) between steps 3 and 4 of ten: the per-step losses, the final fp32 masters and module parameters
      and Adam's moments of every tensor (experts by id) equal the run that never moved (1e-6 relative), and the
      experts did change ranks; under ZeRO 3 the same at EP 2 x 2 data-parallel copies (each expert partitioned
      over its two holders; two experts per rank, swapped between the ranks);
    * ``"replace_every": 3`` under ZeRO 2 on two emulated nodes with a slow link and a router steered to choose
      cross-node pairs: the engine's hook moves experts after step 3 (the monitor's JSONL file logs the move),
      and the run equals the one with ``replace_every`` 0 (1e-6); ``engine.save_checkpoint`` then refuses, and so
      does a move between backward and ``engine.step`` (ZeRO's buckets hold the gradients);
    * resume: ``save_training_state(path, engine)`` at EP 4 after step 3, ``load_training_state`` into an engine
      built anew from other weights at EP 2 x 2 copies (ZeRO 1; ZeRO 2 after a move; ZeRO 2 -> 3) and at EP 4
      under ZeRO 0 (another stage); and EP 8 -> 6 (8 experts colocated on 6 ranks, another world, ZeRO 2): three
      more steps equal six steps straight (1e-6; Adam's second moment 2e-6, ``TOLS``).

Run with ``-s`` to see the measured differences.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from hf_models import steer_pairs, tiny_model, tokens, worst_difference  # noqa: E402
from largeep_plugin.tools.launch import run_world  # noqa: E402

SEQ, STEPS, SWAP_AFTER = 8, 10, 3
BATCH = 96          # sequences per step, split over the ranks (divisible by 4, 6 and 8): enough that a move pays
TOL = 1e-6
# Adam's second moment holds squared gradients: the rounding of a gradient summed in another order (another EP
# size reduces over other groups) counts twice in it, relative.
TOLS = {"loss": TOL, "param": TOL, "exp_avg": TOL, "exp_avg_sq": 2 * TOL}


def _config(stage: int, world: int, large_ep: dict | None, unmanaged: bool = False) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    if unmanaged:   # replicas: their gradients are summed in the engine's step, before it reduces them
        cfg["managed_gradient_accumulation"] = False
    if large_ep is not None:
        cfg["large_ep"] = large_ep
    return cfg


def _slow_two_nodes(experts: int, ranks: int):  # type: ignore[no-untyped-def]
    """Experts in blocks on two nodes of ranks/2 joined by a link slow enough (no latency) that the planner weighs
    this tiny model's rows and moves as it would a large model's."""
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Link, Topology

    per = experts // ranks
    slow = Link(bandwidth_gbytes_per_s=1e-3, latency_us=0.0)
    return Placement(topology=Topology.uniform(2, ranks // 2, inter_node=slow), num_experts=experts,
                     rank_to_experts=tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ranks)))


def _engine(stage: int, ep_size: int, experts: int = 4, seed: int = 0, placement=None, unmanaged: bool = False,  # type: ignore[no-untyped-def]
            **section):
    import torch.distributed as dist

    from largeep_plugin.integrations.deepspeed.engine import initialize

    model = tiny_model("mixtral", experts, seed=seed)
    steer_pairs(model)
    large_ep = {"enabled": True, "ep_size": ep_size, "allow_colocate": True,
                "load_balance": {"bias_update_rate": 0.01}, **section}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation
        engine, *_ = initialize(model=model, model_parameters=list(model.parameters()),
                                config=_config(stage, dist.get_world_size(), large_ep, unmanaged), placement=placement)
    return engine


def _layers(engine):  # type: ignore[no-untyped-def]
    from largeep_plugin.layer.moe_layer import moe_layers

    return list(moe_layers(engine.module))


def _mirror(engine) -> None:  # type: ignore[no-untyped-def]
    """Every layer's experts to the mirrored EP rank (a layout a planner might choose), with their state."""
    import largeep_plugin as lep
    from largeep_plugin.integrations.deepspeed import DeepSpeedState

    access = DeepSpeedState(engine)
    for _, layer in _layers(engine):
        home = layer.home_layout()
        lep.move_experts(layer, tuple(home[len(home) - 1 - r] for r in range(len(home))), access)


def _steps(engine, steps: range, move_after: int | None = None) -> list[float]:  # type: ignore[no-untyped-def]
    """Mean loss over the world per step; each rank its share of the step's global batch."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for step in steps:
        ids = tokens(BATCH, SEQ, seed=1000 + step % 2).chunk(world)[rank]   # two batches, in turn: it learns them
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if move_after is not None and step + 1 == move_after:
            _mirror(engine)
        total = loss.detach().clone()
        dist.all_reduce(total)
        out.append(float(total) / world)
    return out


def _logical(engine) -> dict[str, tuple[torch.Tensor, ...]]:  # type: ignore[no-untyped-def]
    """(fp32 master, exp_avg, exp_avg_sq) of every parameter by logical name (experts by id), read through the
    access (collective, model order); the module's parameter beside the master; each layer's bias."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from largeep_plugin.integrations.deepspeed import DeepSpeedState

    access = DeepSpeedState(engine)
    names = {}
    out = {}
    for name, layer in _layers(engine):
        for e, module in layer.local_experts():
            for n, p in module.named_parameters():
                names[id(p)] = f"{name}.expert{e}.{n}"
        out[f"{name}.bias"] = (layer.router.expert_bias.clone(),)
    params = list(engine.module.named_parameters())
    with GatheredParameters([p for _, p in params]):
        working = {id(p): p.detach().clone() for _, p in params}
    for n, p in params:
        s = access.read(p, grad=False)
        key = names.get(id(p), n)
        out[key] = (s["param"].clone(), s["optim.exp_avg"].clone(), s["optim.exp_avg_sq"].clone())
        out[key + ".working"] = (working[id(p)].reshape(s["param"].shape),)
    return out


def _moved_run(stage: int, ep_size: int, experts: int, placement=None, **section) -> dict:  # type: ignore[no-untyped-def]
    """Ten steps straight and ten with every layer's experts mirrored after step 3."""
    out = {}
    still = _engine(stage, ep_size, experts, placement=placement, **section)
    out["still"] = (_steps(still, range(STEPS)), _logical(still))
    moved = _engine(stage, ep_size, experts, placement=placement, **section)
    before = [layer.home_layout() for _, layer in _layers(moved)]
    out["moved"] = (_steps(moved, range(STEPS), move_after=SWAP_AFTER), _logical(moved))
    out["layouts"] = (before, [layer.home_layout() for _, layer in _layers(moved)])
    return out


def _planned_run(tmp: str) -> dict:
    """ZeRO 2, ``replace_every`` 3 on two slow-linked nodes: the engine's hook decides and moves."""
    jsonl = os.path.join(tmp, "moves.jsonl")
    engine = _engine(2, 4, placement=_slow_two_nodes(4, 4), replace_every=3, monitor={"jsonl_path": jsonl})
    out = {"planned": (_steps(engine, range(STEPS)), _logical(engine))}
    try:
        engine.save_checkpoint(os.path.join(tmp, "engine_ckpt"), tag="t")
        out["save_checkpoint"] = "no error"
    except NotImplementedError as e:
        out["save_checkpoint"] = str(e)
    return out


def _moves_world(rank: int, world: int, tmp: str) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    out = {
        "z1": _moved_run(1, 4, 4, placement=_slow_two_nodes(4, 4)),
        "z2": _moved_run(2, 4, 4, placement=_slow_two_nodes(4, 4)),
        "z3": _moved_run(3, 2, 4),   # EP 2 x 2 copies: two experts per rank, each partitioned over its two holders
        "z3_ep4": _moved_run(3, 4, 4, placement=_slow_two_nodes(4, 4)),
    }
    out.update(_planned_run(tmp))
    # Between backward and the step the gradients sit in ZeRO's buckets: a move there is refused.
    engine = _engine(2, 4)
    ids = tokens(BATCH, SEQ, seed=1000).chunk(world)[rank]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    try:
        _mirror(engine)
        out["mid_step"] = "no error"
    except NotImplementedError as e:
        out["mid_step"] = str(e)
    return out


@pytest.fixture(scope="module")
def moves(tmp_path_factory):  # type: ignore[no-untyped-def]
    import transformers  # noqa: F401  (imported once here, not once per forked rank)
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    tmp = str(tmp_path_factory.mktemp("ds_moves"))
    out = run_world(_moves_world, 4, args=(tmp,), timeout=900)
    out[0]["tmp"] = tmp
    return out


@pytest.mark.parametrize("case", ["z1", "z2", "z3", "z3_ep4"])
def test_a_move_under_zero_is_the_same_math(moves, case: str) -> None:
    before, after = moves[0][case]["layouts"]
    assert all(a != b for a, b in zip(before, after)), (before, after)
    still = (moves[0][case]["still"][0], [r[case]["still"][1] for r in moves])
    moved = (moves[0][case]["moved"][0], [r[case]["moved"][1] for r in moves])
    assert still[0][-1] < still[0][0] - 0.05, still[0]   # it trains
    worst = worst_difference(still, moved)
    print(f"move under ZeRO {case[1]}: largest relative differences {worst}")
    assert all(v <= TOL for v in worst.values()), worst


def test_the_engine_moves_when_the_planner_says_so(moves) -> None:
    still = (moves[0]["z2"]["still"][0], [r["z2"]["still"][1] for r in moves])
    planned = (moves[0]["planned"][0], [r["planned"][1] for r in moves])
    with open(os.path.join(moves[0]["tmp"], "moves.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    decisions = [(r["step"], r["layer"], r["replan"]) for r in records if r.get("replan", {}).get("kind") == "move"]
    assert [(s, layer) for s, layer, _ in decisions] == [(s, f"model.layers.{i}.mlp.moe") for s in (3, 6, 9)
                                                          for i in (0, 1)], decisions
    first = [d for s, _, d in decisions if s == 3]
    assert all(d["moved"] and d["bytes"] > 0 and d["predicted_gain"] > 0.05 for d in first), first
    worst = worst_difference(still, planned)
    print(f"moved by the planner (ZeRO 2): largest relative differences {worst}")
    assert all(v <= TOL for v in worst.values()), worst
    assert moves[0]["mid_step"].startswith("zero_optimization.stage=2: moving experts between backward and "
                                           "engine.step is not supported"), moves[0]["mid_step"]
    assert moves[0]["save_checkpoint"].startswith("engine.save_checkpoint after the experts of model.layers.0"), \
        moves[0]["save_checkpoint"]


# ---- resume at another EP size ----------------------------------------------------------------------------------

HALF = 3


def _first_half(stage: int, ep_size: int, experts: int, path: str, move: bool, unmanaged: bool = False
                ) -> tuple[list[float], dict]:
    """The run that never stops (returned: its losses after the save point and its final state), then a new run's
    first half and its save (both move after step 2 with ``move``)."""
    from largeep_plugin.integrations.deepspeed import save_training_state

    straight = _engine(stage, ep_size, experts, unmanaged=unmanaged)
    losses = _steps(straight, range(2 * HALF), move_after=2 if move else None)
    out = (losses[HALF:], _logical(straight))
    first = _engine(stage, ep_size, experts, unmanaged=unmanaged)
    _steps(first, range(HALF), move_after=2 if move else None)
    save_training_state(path, first, extra={"step": HALF})
    return out


def _second_half(stage: int, ep_size: int, experts: int, path: str, placement=None,  # type: ignore[no-untyped-def]
                 unmanaged: bool = False) -> tuple[list[float], dict]:
    """An engine built anew from other weights at ``ep_size``, loaded, three more steps."""
    from largeep_plugin.integrations.deepspeed import load_training_state

    engine = _engine(stage, ep_size, experts, seed=7, placement=placement, unmanaged=unmanaged)
    extra = load_training_state(path, engine)
    assert extra == {"step": HALF}, extra
    return _steps(engine, range(HALF, 2 * HALF)), _logical(engine)


def _resume_world(rank: int, world: int, tmp: str) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    out = {}
    # (ZeRO stage saved, moved before the save, [(ZeRO stage resumed, EP resumed)])
    for stage, move, resumes in ((1, False, [(1, 2), (0, 4)]), (2, True, [(2, 2), (3, 2)])):
        path = os.path.join(tmp, f"z{stage}")
        out[f"straight_z{stage}"] = _first_half(stage, 4, 4, path, move)
        files = sorted(os.listdir(os.path.join(path, "experts"))) if rank == 0 else []
        out[f"files_z{stage}"] = files
        for resumed_stage, ep in resumes:
            out[f"z{stage}_to_z{resumed_stage}_ep{ep}"] = _second_half(resumed_stage, ep, 4, path)
    return out


def _eight_world(rank: int, world: int, path: str) -> tuple[list[float], dict]:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    return _first_half(2, 8, 8, path, move=False)


def _six_world(rank: int, world: int, path: str) -> tuple[list[float], dict]:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm
    from largeep_plugin.placement.plan import plan_placement
    from largeep_plugin.placement.topology import Topology

    init_deepspeed_comm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation
        placement = plan_placement(8, Topology.uniform(1, 6), allow_colocate=True)
    return _second_half(2, 6, 8, path, placement=placement)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):  # type: ignore[no-untyped-def]
    import transformers  # noqa: F401
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    tmp = str(tmp_path_factory.mktemp("ds_resume"))
    return run_world(_resume_world, 4, args=(tmp,), timeout=900)


@pytest.mark.parametrize("case", ["z1_to_z1_ep2", "z1_to_z0_ep4", "z2_to_z2_ep2", "z2_to_z3_ep2"])
def test_resume_at_another_ep_size_equals_the_run_that_never_stopped(resumed, case: str) -> None:
    saved = case.split("_to_")[0]
    assert resumed[0][f"files_{saved}"] == sorted(f"model.layers.{i}.mlp.moe.experts.{e}.pt" for i in (0, 1)
                                                 for e in range(4))
    want = (resumed[0][f"straight_{saved}"][0], [r[f"straight_{saved}"][1] for r in resumed])
    got = (resumed[0][case][0], [r[case][1] for r in resumed])
    worst = worst_difference(want, got)
    print(f"resume {case}: largest relative differences {worst}")
    assert all(v <= TOLS.get(k, 0.0) for k, v in worst.items()), (case, worst)


def _saved_then_resumed(path: str, save, saved_world: int, load, loaded_world: int, label: str) -> list:  # type: ignore[no-untyped-def]
    """The run that never stops and its save in a world of ``saved_world``, then the resume in one of
    ``loaded_world``: asserts the next steps equal, returns the resumed ranks' (losses, state)."""
    import transformers  # noqa: F401
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    straight = run_world(save, saved_world, args=(path,), timeout=900)
    got = run_world(load, loaded_world, args=(path,), timeout=900)
    worst = worst_difference((straight[0][0], [r[1] for r in straight]), (got[0][0], [r[1] for r in got]))
    print(f"resume {label}: largest relative differences {worst}")
    assert all(v <= TOLS.get(k, 0.0) for k, v in worst.items()), worst
    return got


def test_resume_from_ep8_at_ep6_colocated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _saved_then_resumed(str(tmp_path / "ep8"), _eight_world, 8, _six_world, 6, "EP 8 -> 6 (ZeRO 2)")


def _four_world(rank: int, world: int, path: str) -> tuple[list[float], dict]:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    return _first_half(1, 4, 4, path, move=False, unmanaged=True)


def _eight_replicas_world(rank: int, world: int, path: str) -> tuple[list[float], dict]:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Topology

    init_deepspeed_comm()
    placement = Placement(topology=Topology.uniform(1, 8), num_experts=4,
                          rank_to_experts=tuple((r // 2,) for r in range(8)))    # every expert on two ranks
    return _second_half(1, 8, 4, path, placement=placement, unmanaged=True)


def test_resume_from_ep4_at_ep8_with_replicas(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # 4 experts saved once each at EP 4 (ZeRO 1) load into 8 slots, two copies of each (replicas, whose gradients
    # the engine sums over their replica group): the next steps are the run that never stopped at EP 4.
    got = _saved_then_resumed(str(tmp_path / "ep4"), _four_world, 4, _eight_replicas_world, 8,
                              "EP 4 -> 8 with replicas (ZeRO 1)")
    # worst_difference sees one copy per name: the two copies of every expert must be one and the same.
    copies: dict = {}
    for _, state in got:
        for name, value in state.items():
            copies.setdefault(name, []).append(value)
    twice = {n: c for n, c in copies.items() if ".expert" in n and not n.endswith(".working")}
    assert twice and all(len(c) == 2 for c in twice.values()), {n: len(c) for n, c in copies.items()}
    assert all(torch.equal(a, b) for c in twice.values() for a, b in zip(*c)), "the replicas of an expert differ"


def _eight_moves_world(rank: int, world: int) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    return _moved_run(2, 8, 8, placement=_slow_two_nodes(8, 8))


def test_a_move_at_ep8_under_zero2_is_the_same_math() -> None:
    import transformers  # noqa: F401
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    got = run_world(_eight_moves_world, 8, timeout=900)
    before, after = got[0]["layouts"]
    assert all(a != b for a, b in zip(before, after)), (before, after)
    worst = worst_difference((got[0]["still"][0], [r["still"][1] for r in got]),
                             (got[0]["moved"][0], [r["moved"][1] for r in got]))
    print(f"move at EP 8 under ZeRO 2: largest relative differences {worst}")
    assert all(v <= TOL for v in worst.values()), worst
