"""The host-sync budget of the layer on every dispatch path, counted on CPU (``sync_counter.py``).

One forward may read the device back once: the count exchange's ``comm.read_back``, which carries the split sizes,
the input checks and, in the same read, the global load summed on the device (for the clone planner of dynamic
replicas). No other operator that would make the host wait on a GPU runs in the forward, and nothing at all in the
backward. The same for the Megatron layer, whose read-back sits in the compute-side ``dispatch_preprocess``.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from conftest import world
from sync_counter import SyncCounter

# name: (LargeEPConfig overrides, layer setup)
PATHS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "flat": ({}, {}),
    "flat, load in its own all_reduce": ({}, {"load_apart": True}),
    "capacity": ({"capacity_factor": 1.0}, {}),
    "chunked": ({"overlap_chunks": 2}, {}),
    "hierarchical": ({"dispatch": "hierarchical"}, {"ranks_per_node": 2}),
    "hierarchical+chunked": ({"dispatch": "hierarchical", "overlap_chunks": 2}, {"ranks_per_node": 2}),
    "colocated": ({"num_experts": 8}, {"colocated": True}),
    "colocated+chunked": ({"num_experts": 8, "overlap_chunks": 2}, {"colocated": True}),
    "colocated, grouped GEMM": ({"num_experts": 8, "grouped_gemm": True}, {"colocated": True}),
    "shared expert (DeepSeek-V3 shape)": ({"num_experts": 8, "num_groups": 4, "group_topk": 2, "score_function": "sigmoid",
                                           "routed_scaling_factor": 2.5, "shared_ffn_hidden_size": 16,
                                           "seq_aux_loss_coeff": 0.01},
                                          {"colocated": True}),
    "colocated+hierarchical": ({"num_experts": 8, "dispatch": "hierarchical", "capacity_factor": 1.0},
                               {"colocated": True, "ranks_per_node": 2}),
    "replicated": ({"num_experts": 2, "capacity_factor": 1.0}, {"replicated": True}),
    "expert_tp": ({"num_experts": 2}, {"expert_tp": True}),
    # Dynamic replicas, with clones planned from a skewed warm-up (the load reaches the host in the one read-back;
    # apart, in its own all_reduce, it is read at the re-plan, after the step).
    "dynamic replicas": ({"dynamic_replicas": 1}, {"dynamic": True}),
    "dynamic replicas, load apart": ({"dynamic_replicas": 1}, {"dynamic": True, "load_apart": True}),
    "dynamic replicas+chunked": ({"dynamic_replicas": 2, "overlap_chunks": 2}, {"dynamic": True}),
    "dynamic replicas+hierarchical": ({"dynamic_replicas": 1, "dispatch": "hierarchical"},
                                      {"dynamic": True, "ranks_per_node": 2}),
    "dynamic replicas+colocated": ({"num_experts": 8, "dynamic_replicas": 1}, {"dynamic": True, "colocated": True}),
}


def _layer(rank: int, overrides: dict[str, Any], setup: dict[str, Any]) -> Any:
    from largeep_plugin import LargeEPConfig, LargeEPMoE, Placement, Topology

    kw = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, activation="swiglu", init_std=0.5)
    cfg = LargeEPConfig(**{**kw, **overrides})
    topo = Topology.uniform(2, 2)
    placement = None
    if setup.get("colocated"):
        placement = Placement(topology=topo, num_experts=8, rank_to_experts=tuple((2 * r, 2 * r + 1) for r in range(4)))
    elif setup.get("replicated"):
        placement = Placement(topology=topo, num_experts=2, rank_to_experts=((0,), (1,), (0,), (1,)))
    elif setup.get("expert_tp"):
        placement = Placement(topology=topo, num_experts=2, rank_to_experts=((0,), (0,), (1,), (1,)),
                              expert_tp_degree=2)
    return LargeEPMoE(cfg, placement=placement, ranks_per_node=setup.get("ranks_per_node"))


def _count(fn: Any) -> tuple[dict[str, int], int]:
    counter = SyncCounter()
    with counter:
        fn()
    return dict(counter.counts), counter.read_backs


def _paths_rank(rank: int, world_size: int) -> dict[str, Any]:
    import largeep_plugin.layer.comm as comm

    warnings.simplefilter("ignore")  # the colocation warning
    out = {}
    limit = comm.LOAD_IN_EXCHANGE_LIMIT
    for name, (overrides, setup) in PATHS.items():
        # A large EP group sums the load in an all_reduce of its own: forced here with a limit of 0.
        comm.LOAD_IN_EXCHANGE_LIMIT = 0 if setup.get("load_apart") else limit
        layer = _layer(rank, overrides, setup)
        x = torch.randn(6 + rank, 8, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        if setup.get("dynamic"):
            layer.router.expert_bias[0] = 5.0  # expert 0 in every token's top 2: the plan clones it
        layer(x).sum().backward()  # warm-up: first-call work is not the steady state
        if setup.get("dynamic"):
            from largeep_plugin import rebalance

            rebalance(layer)
            assert layer.clones.plan.num_clones > 0, name
            layer(x).sum().backward()  # the first forward and backward with clones
        result: dict[str, Any] = {}
        y = None

        def forward() -> None:
            nonlocal y
            y = layer(x)

        result["forward"] = _count(forward)
        result["backward"] = _count(lambda: y.sum().backward())
        # The load statistics stay on the device: reading them is the user's choice, not the layer's.
        result["stats_total"] = int(layer.last_stats.tokens_per_expert_E.sum())
        result["counts"] = layer.last_stats.tokens_per_expert_E.tolist()
        out[name] = result
    comm.LOAD_IN_EXCHANGE_LIMIT = limit
    return out


@pytest.fixture(scope="module")
def paths() -> list[dict[str, Any]]:
    return world(_paths_rank, 4, timeout=300.0)


@pytest.mark.parametrize("name", list(PATHS))
def test_one_read_back_per_forward_and_nothing_else(paths: list[dict[str, Any]], name: str) -> None:
    for rank, result in enumerate(paths):
        ops, read_backs = result[name]["forward"]
        assert ops == {}, f"{name}, rank {rank}: operators that wait on the device: {ops}"
        assert read_backs == 1, f"{name}, rank {rank}: {read_backs} read-backs in one forward"
        ops, read_backs = result[name]["backward"]
        assert ops == {} and read_backs == 0, f"{name}, rank {rank} backward: {ops}, {read_backs} read-backs"
    # The global load summed on the device equals the assignments of all ranks (6+r tokens each, top-2; with
    # expert TP every assignment is counted once, before it is copied to the shards).
    assert {r[name]["stats_total"] for r in paths} == {2 * sum(6 + r for r in range(4))}


def test_load_summed_apart_equals_the_load_in_the_exchange(paths: list[dict[str, Any]]) -> None:
    for r in paths:
        assert r["flat, load in its own all_reduce"]["counts"] == r["flat"]["counts"]


# ---- the counter itself -----------------------------------------------------------------------------------------
def test_counter_sees_what_would_wait_and_ignores_host_data() -> None:
    ids = torch.tensor([[0, 2], [2, 1]]) * torch.ones(2, 2, dtype=torch.int64)  # a "device" tensor: computed

    def waits() -> None:
        host = torch.tensor([3, 1, 2])  # made from host data
        torch.bincount(ids.reshape(-1))
        ids.nonzero()
        ids[ids > 0]
        int(ids.sum())
        ids.tolist()
        torch.repeat_interleave(torch.arange(3), host * 1 + ids[0, 0])

    def does_not_wait() -> None:
        host = torch.tensor([3, 1, 2])
        torch.zeros(3, dtype=torch.int64).scatter_add_(0, ids.reshape(-1), torch.ones(4, dtype=torch.int64))
        torch.sort(ids.reshape(-1), stable=True)
        host.tolist()
        int(host.sum())
        torch.repeat_interleave(torch.arange(3), host, output_size=6)

    counts, _ = _count(waits)
    assert counts == {"bincount": 1, "nonzero": 1, "index[bool mask]": 1, "_local_scalar_dense": 1, "tolist": 1,
                      "repeat_interleave": 1}, counts
    assert _count(does_not_wait) == ({}, 0)


# ---- Megatron ---------------------------------------------------------------------------------------------------
def _megatron_rank(rank: int, world_size: int) -> dict[str, Any]:
    from megatron_helpers import init_megatron, tiny_config

    from largeep_plugin.integrations.megatron import LargeEPMoELayer

    warnings.simplefilter("ignore")
    init_megatron(ep=world_size)
    x = torch.randn(5, 2, 12, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    import largeep_plugin.layer.comm as comm

    out = {}
    limit = comm.LOAD_IN_EXCHANGE_LIMIT
    # Without the switch loss the load rides in the exchange (or, for a large group, has an all_reduce of its own:
    # forced with a limit of 0); with it the router all-reduces the counts itself. All on the device.
    for coeff, apart in ((0.0, False), (0.0, True), (0.1, False)):
        comm.LOAD_IN_EXCHANGE_LIMIT = 0 if apart else limit
        torch.manual_seed(0)
        layer = LargeEPMoELayer(tiny_config(num_moe_experts=world_size, moe_aux_loss_coeff=coeff), layer_number=1)
        layer(x)[0].sum().backward()
        counter = SyncCounter()
        dispatcher = layer.token_dispatcher
        for stage in ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "token_combine"):
            def staged(*args: Any, _real: Any = getattr(dispatcher, stage), _stage: str = stage, **kwargs: Any) -> Any:
                counter.place = _stage
                try:
                    return _real(*args, **kwargs)
                finally:
                    counter.place = ""
            setattr(dispatcher, stage, staged)
        with counter:
            y = layer(x)[0]
        forward = (dict(counter.counts), counter.read_back_places)
        out[(coeff, apart)] = {"forward": forward, "backward": _count(lambda: y.sum().backward()),
                               "counts": layer.last_stats.tokens_per_expert_E.tolist()}
    comm.LOAD_IN_EXCHANGE_LIMIT = limit
    return out


def test_megatron_layer_reads_back_once_in_its_compute_side_step() -> None:
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    for result in world(_megatron_rank, 2, timeout=180.0):
        for coeff, r in result.items():
            # One read-back, in dispatch_preprocess (as Megatron's all-to-all dispatcher syncs in its preprocess):
            # under Megatron's EP overlap the host never blocks on the communication node.
            assert r["forward"] == ({}, ["dispatch_preprocess"]), (coeff, r)
            assert r["backward"] == ({}, 0), (coeff, r)
        assert result[(0.0, False)]["counts"] == result[(0.0, True)]["counts"] == result[(0.1, False)]["counts"]
