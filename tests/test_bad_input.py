"""Bad input to the layer: a ValueError that names the problem on every rank, never a hang or a wrong answer.

A bad input on one rank (hidden size, NaN/Inf, a dtype the experts cannot take or that differs between ranks) must
raise on all ranks (the layer exchanges its input checks in its one count all-to-all),
and the world must still work afterwards. Config-level errors (unknown key, wrong type, top_k > num_experts) are
in test_config.py.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from conftest import HIDDEN, make_config, world
from largeep_plugin.layer.moe_layer import LargeEPMoE


def _outcome(call: Callable[[], object]) -> tuple[str, str]:
    """('ok', '') or (exception type name, message)."""
    try:
        call()
    except Exception as exc:  # the test inspects the type: anything but ValueError fails it
        return type(exc).__name__, str(exc)
    return "ok", ""


def _tokens(rank: int, t: int = 6, h: int = HIDDEN) -> torch.Tensor:
    return torch.randn(t, h, generator=torch.Generator().manual_seed(rank))


def _bad_input_rank(rank: int, world_size: int) -> dict[str, tuple[str, str]]:
    layer = LargeEPMoE(make_config(world_size))
    out = {}
    out["hidden-all"] = _outcome(lambda: layer(_tokens(rank, h=HIDDEN + 1)))
    out["hidden-rank2"] = _outcome(lambda: layer(_tokens(rank, h=5 if rank == 2 else HIDDEN)))
    out["scalar-rank1"] = _outcome(lambda: layer(torch.tensor(1.0) if rank == 1 else _tokens(rank)))

    def nan_on_1() -> torch.Tensor:
        x = _tokens(rank)
        if rank == 1:
            x[3, 4] = float("nan")
        return layer(x)

    def inf_on_0_and_3() -> torch.Tensor:
        x = _tokens(rank).view(2, 3, HIDDEN)
        if rank in (0, 3):
            x[1, 2, 0] = -float("inf")
        return layer(x)

    out["nan-rank1"] = _outcome(nan_on_1)
    out["inf-ranks0,3"] = _outcome(inf_on_0_and_3)
    # A dtype the experts cannot take, or ranks that disagree (their all-to-alls would differ in bytes: a crash).
    out["bf16-all"] = _outcome(lambda: layer(_tokens(rank).bfloat16()))
    fp16_on_1 = lambda: _tokens(rank).half() if rank == 1 else _tokens(rank)  # noqa: E731
    out["fp16-rank1"] = _outcome(lambda: layer(fp16_on_1()))
    chunked = LargeEPMoE(make_config(world_size, overlap_chunks=2))
    hierarchical = LargeEPMoE(make_config(world_size, dispatch="hierarchical"), ranks_per_node=2)
    for name, other in (("chunked", chunked), ("hierarchical", hierarchical)):
        out[f"fp16-rank1-{name}"] = _outcome(lambda: other(fp16_on_1()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype is one the experts take
        out["autocast-bf16"] = _outcome(lambda: layer(_tokens(rank).bfloat16()))
    # After all that the world is in step: a good forward still works and matches a fresh layer's.
    x = _tokens(rank)
    y = layer(x)
    same = torch.equal(y, LargeEPMoE(make_config(world_size))(x))
    out["good-after"] = ("ok" if same else "differs", "")
    # Without the collective check a bad hidden size on every rank is still a local ValueError.
    unchecked = LargeEPMoE(make_config(world_size, check_inputs=False))
    out["hidden-all-unchecked"] = _outcome(lambda: unchecked(_tokens(rank, h=3)))
    dist.barrier()
    return out


def test_bad_inputs_raise_on_every_rank() -> None:
    results = world(_bad_input_rank, 4)
    for rank, r in enumerate(results):
        for case, (kind, msg) in r.items():
            if case in ("good-after", "autocast-bf16"):
                assert kind == "ok", f"rank {rank}: the layer is broken after the errors"
                continue
            assert kind == "ValueError", f"rank {rank}, {case}: {kind}: {msg}"
        assert "hidden_size=12" in r["hidden-all"][1] and "[0, 1, 2, 3]" in r["hidden-all"][1]
        assert f"(6, {HIDDEN + 1})" in r["hidden-all"][1]
        # One rank's wrong hidden size is named on every rank; the bad rank also shows its shape.
        assert "hidden_size=12" in r["hidden-rank2"][1] and "rank(s) [2]" in r["hidden-rank2"][1]
        assert ("(6, 5)" in r["hidden-rank2"][1]) == (rank == 2)
        assert "rank(s) [1]" in r["scalar-rank1"][1]
        assert "NaN" in r["nan-rank1"][1] and "rank(s) [1]" in r["nan-rank1"][1]
        assert "Inf" in r["inf-ranks0,3"][1] and "rank(s) [0, 3]" in r["inf-ranks0,3"][1]
        assert "hidden_size=12" in r["hidden-all-unchecked"][1] and "(6, 3)" in r["hidden-all-unchecked"][1]
        assert "dtype does not match" in r["bf16-all"][1] and "bfloat16 on rank(s) [0, 1, 2, 3]" in r["bf16-all"][1]
        assert "takes float32" in r["bf16-all"][1]
        for case in ("fp16-rank1", "fp16-rank1-chunked", "fp16-rank1-hierarchical"):
            msg = r[case][1]
            assert "differs between EP ranks: float32 on rank(s) [0, 2, 3], float16 on rank(s) [1]" in msg, (case, msg)


def _group_size_rank(rank: int, world_size: int) -> dict[str, tuple[str, str]]:
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank takes part in creating every group
    half = halves[rank // 2]
    out = {"world": _outcome(lambda: LargeEPMoE(make_config(world_size + 2)))}
    if rank < 2:
        out["subgroup"] = _outcome(lambda: LargeEPMoE(make_config(world_size), ep_group=half))
    # Two copies of a 2-rank EP group: every rank builds its layer (the expert-DP groups are built collectively).
    out["subgroup-ok"] = _outcome(lambda: LargeEPMoE(make_config(2), ep_group=half)(_tokens(rank)))
    return out


def test_group_size_must_equal_num_experts() -> None:
    results = world(_group_size_rank, 4)
    for rank, r in enumerate(results):
        kind, msg = r["world"]
        assert kind == "ValueError" and "num_experts=6" in msg and "4 ranks" in msg, (rank, r)
        if rank < 2:
            kind, msg = r["subgroup"]
            assert kind == "ValueError" and "num_experts=4" in msg and "2 ranks" in msg, (rank, r)
        assert r["subgroup-ok"] == ("ok", "")


def test_placement_must_fit_the_group_and_the_experts() -> None:
    cfg = make_config(4)
    too_long = SimpleNamespace(rank_to_expert=[0, 1], destination_ranks=None)
    with pytest.raises(ValueError, match="2 entries"):
        LargeEPMoE(cfg, placement=too_long)
    outside = SimpleNamespace(rank_to_expert=[7], destination_ranks=None)
    with pytest.raises(ValueError, match="expert 7"):
        LargeEPMoE(cfg, placement=outside)


def test_single_process_bad_input() -> None:
    layer = LargeEPMoE(make_config(1, top_k=1))
    with pytest.raises(ValueError, match=r"hidden_size=12.*\(4, 8\)"):
        layer(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(torch.full((2, HIDDEN), float("nan")))
    with pytest.raises(ValueError, match=r"dtype does not match.*float64 on rank\(s\) \[0\]"):
        layer(torch.zeros(2, HIDDEN, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dtype does not match.*bfloat16"):
        LargeEPMoE(make_config(1, top_k=1, check_inputs=False))(torch.zeros(2, HIDDEN, dtype=torch.bfloat16))
    assert layer.to(torch.float64)(torch.zeros(2, HIDDEN, dtype=torch.float64)).dtype == torch.float64
