"""Bad input to the layer: a ValueError that names the problem on every rank, never a hang or a wrong answer.

A bad input on one rank must raise on all ranks (the layer exchanges its input checks in its one all_reduce),
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
            if case == "good-after":
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
