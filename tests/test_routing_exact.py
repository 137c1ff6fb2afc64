"""Exact routing: every row arrives where it should, in the expected order, and combine brings it home.

Dispatcher payloads are tagged with (source rank, token index), so a routing bug shows in the data. The layer is
checked by replacing its expert with a recorder, and under extreme routing (one expert takes everything, experts
with no token, ranks with no token, one token in the whole world) against the dense reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import HIDDEN, assert_parity, global_batch, make_config, merge_ranks, parity_errors, rank_slice, world
from largeep_plugin.layer.dispatcher import AllToAllDispatcher, permute_by_destination
from largeep_plugin.layer.moe_layer import LargeEPMoE

K = 2
TAG_H = 4  # columns: source rank, token index, then two free columns


def _plan(rank: int, world_size: int, tokens: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s destinations, keep mask and weights; every rank can recompute any rank's plan."""
    t = tokens[rank]
    gen = torch.Generator().manual_seed(rank)
    dest_TK = torch.randint(0, world_size, (t, K), generator=gen)
    keep_TK = torch.rand(t, K, generator=gen) > 0.25
    weights_TK = torch.rand(t, K, generator=gen) + 0.5
    return dest_TK, keep_TK, weights_TK


def _dispatcher_rank(rank: int, world_size: int, tokens: tuple[int, ...]) -> dict[str, object]:
    dest_TK, keep_TK, weights_TK = _plan(rank, world_size, tokens)
    t = dest_TK.shape[0]
    x_TH = torch.zeros(t, TAG_H)
    x_TH[:, 0] = rank
    x_TH[:, 1] = torch.arange(t, dtype=torch.float32)
    x_TH[:, 2] = torch.randn(t, generator=torch.Generator().manual_seed(50 + rank))
    x_TH.requires_grad_(True)
    weights_TK.requires_grad_(True)

    dispatcher = AllToAllDispatcher(None)
    rows_MH, handle = dispatcher.dispatch(x_TH, dest_TK, keep_TK, weights_TK)

    # Expected arrivals: grouped by source rank, each source's kept (token, k) pairs in flattened order.
    expected = []
    for src in range(world_size):
        s_dest, s_keep, _ = _plan(src, world_size, tokens)
        for tok in range(s_dest.shape[0]):
            for k in range(K):
                if s_keep[tok, k] and s_dest[tok, k] == rank:
                    expected.append((src, tok))
    arrived = [(int(a), int(b)) for a, b in rows_MH[:, :2].tolist()]

    # The "expert" scales each row by (receiving rank + 1): the result shows which rank computed each row.
    y_TH = dispatcher.combine(rows_MH * (rank + 1), handle)
    scale_T = (weights_TK.detach() * keep_TK * (dest_TK + 1)).sum(dim=1)
    g_TH = torch.randn(t, TAG_H, generator=torch.Generator().manual_seed(90 + rank))
    (y_TH * g_TH).sum().backward()
    # dL/dw[t, k] = keep * (dest + 1) * <x[t], g[t]>: the gradient of each weight went to its own slot.
    want_dw = keep_TK * (dest_TK + 1) * (x_TH.detach() * g_TH).sum(dim=1, keepdim=True)

    # The same exchange in its three steps (route / exchange / send), the weights sent with the rows and applied
    # by the "expert", the handle without weights (combine sums over k): Megatron's dispatcher contract.
    x2_TH = x_TH.detach().clone().requires_grad_(True)
    w2_TK = weights_TK.detach().clone().requires_grad_(True)
    order_A, send_counts_R = dispatcher.route(dest_TK, keep_TK)
    handle2 = dispatcher.exchange(order_A, send_counts_R, num_tokens=t, top_k=K, topk_weights_TK=None)
    rows2_MH = dispatcher.send(x2_TH.index_select(0, handle2.order_A // K), handle2)
    w_M = dispatcher.send(w2_TK.reshape(-1).index_select(0, handle2.order_A), handle2)
    y2_TH = dispatcher.combine(rows2_MH * (rank + 1) * w_M[:, None], handle2)
    (y2_TH * g_TH).sum().backward()
    three_step = [float((y2_TH.detach() - y_TH.detach()).abs().max()) if t else 0.0,
                  float((x2_TH.grad - x_TH.grad).abs().max()) if t else 0.0,
                  float((w2_TK.grad - want_dw).abs().max()) if t else 0.0]
    return {
        "three_step_err": max(three_step),
        "three_step_arrived": [(int(a), int(b)) for a, b in rows2_MH[:, :2].tolist()],
        "arrived": arrived,
        "expected": expected,
        "send_splits": handle.send_splits,
        "recv_splits": handle.recv_splits,
        "y_err": float((y_TH.detach() - x_TH.detach() * scale_T[:, None]).abs().max()) if t else 0.0,
        "dx_err": float((x_TH.grad - g_TH * scale_T[:, None]).abs().max()) if t else 0.0,
        "dw_err": float((weights_TK.grad - want_dw).abs().max()) if t else 0.0,
        "num_kept": int(keep_TK.sum()),
    }


@pytest.mark.parametrize(
    "tokens", [pytest.param((2, 5, 3, 7), id="all-ranks-busy"), pytest.param((0, 5, 3, 7), id="rank0-empty")]
)
def test_dispatch_delivers_tagged_rows_in_order_and_combine_returns_them(tokens: tuple[int, ...]) -> None:
    results = world(_dispatcher_rank, 4, tokens)
    for rank, r in enumerate(results):
        assert r["arrived"] == r["expected"], f"rank {rank} received {r['arrived']}, expected {r['expected']}"
        assert r["y_err"] < 1e-5 and r["dx_err"] < 1e-5 and r["dw_err"] < 1e-5, (rank, r)
        assert r["three_step_arrived"] == r["expected"] and r["three_step_err"] < 1e-5, (rank, r)
        assert sum(r["send_splits"]) == r["num_kept"]
    # What rank a sends to rank b is what rank b receives from rank a.
    for a in range(4):
        for b in range(4):
            assert results[a]["send_splits"][b] == results[b]["recv_splits"][a]
    assert sum(len(r["arrived"]) for r in results) == sum(r["num_kept"] for r in results) > 0


def test_handle_without_weights_needs_top_k() -> None:
    from largeep_plugin.layer.dispatcher import DispatchHandle

    with pytest.raises(ValueError, match="top_k >= 1, got top_k=0"):
        DispatchHandle(order_A=torch.zeros(0, dtype=torch.int64), topk_weights_TK=None, send_splits=(0,),
                       recv_splits=(0,), num_tokens=0)


def test_permute_by_destination_is_stable_and_puts_dropped_last() -> None:
    dest_TK = torch.tensor([[2, 0], [0, 2], [1, 0]])
    keep_TK = torch.tensor([[True, True], [True, False], [True, True]])
    order_A, send_R = permute_by_destination(dest_TK, keep_TK, 4)
    # Flattened assignments: 0->2, 1->0, 2->0, 3->2 (dropped), 4->1, 5->0; the dropped one sorts past the rest.
    assert order_A.tolist() == [1, 2, 5, 4, 0, 3]
    assert send_R.tolist() == [3, 1, 1, 0]
    # Chunked: tokens 0-1 in chunk 0, token 2 in chunk 1; counts per (chunk, destination).
    order_A, send_CR = permute_by_destination(dest_TK, keep_TK, 4, torch.tensor([0, 0, 1]), 2)
    assert order_A.tolist() == [1, 2, 0, 5, 4, 3]
    assert send_CR.tolist() == [[2, 0, 1, 0], [1, 1, 0, 0]]


class _Recorder(nn.Module):
    """Stands in for the expert: remembers the rows it got and returns them scaled by (expert id + 1)."""

    def __init__(self, expert_id: int):
        super().__init__()
        self.expert_id = expert_id
        self.seen: list[torch.Tensor] = []

    def forward(self, rows_MH: torch.Tensor) -> torch.Tensor:
        self.seen.append(rows_MH.detach().clone())
        return rows_MH * (self.expert_id + 1)


def _layer_recorder_rank(rank: int, world_size: int, counts: list[int]) -> dict[str, object]:
    cfg = make_config(world_size, top_k=2)
    x_GH, _ = global_batch(counts, cfg.hidden_size, seed=3)
    layer = LargeEPMoE(cfg)
    layer.expert = _Recorder(layer.expert_id)
    y = layer(x_GH[rank_slice(counts, rank)])

    # The router is replicated, so every rank can compute every rank's choices.
    expected, want_y = [], []
    for src in range(world_size):
        routing = layer.router(x_GH[rank_slice(counts, src)])
        for tok in range(counts[src]):
            for k in range(cfg.top_k):
                if int(routing.topk_ids_TK[tok, k]) == layer.expert_id:
                    expected.append(sum(counts[:src]) + tok)
        if src == rank:
            want_y = (routing.topk_weights_TK.detach() * (routing.topk_ids_TK + 1)).sum(dim=1, keepdim=True)
            want_y = want_y * x_GH[rank_slice(counts, src)]
    (rows,) = layer.expert.seen
    # Identify each received row by its exact content (all global rows are distinct random vectors).
    arrived = [int(torch.nonzero((x_GH == row).all(dim=1))[0]) for row in rows]
    return {
        "arrived": arrived,
        "expected": expected,
        "y_err": float((y.detach() - want_y).abs().max()) if counts[rank] else 0.0,
        "y_shape": tuple(y.shape),
        "counts": layer.last_stats.tokens_per_expert_E.tolist(),
    }


@pytest.mark.parametrize(
    "counts", [pytest.param([4, 9, 3, 6], id="all-ranks-busy"), pytest.param([4, 9, 0, 6], id="rank2-empty")]
)
def test_layer_sends_each_token_to_its_experts_and_back(counts: list[int]) -> None:
    results = world(_layer_recorder_rank, 4, counts)
    for rank, r in enumerate(results):
        assert r["arrived"] == r["expected"], (rank, r)
        assert r["y_err"] < 1e-5, (rank, r)
        assert r["y_shape"] == (counts[rank], HIDDEN)
        assert r["counts"] == [len(x["arrived"]) for x in results]


def _all_to_one_rank(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    e = world_size
    hot = torch.zeros(e)
    hot[2] = 10.0  # far above any score difference: expert 2 is everybody's first choice
    return {
        "all-to-one-top1": parity_errors(make_config(e, top_k=1, normalize_topk=False), [5, 3, 6, 4], expert_bias=hot),
        "all-to-one-top2": parity_errors(make_config(e, top_k=2), [5, 3, 6, 4], seed=1, expert_bias=hot),
    }


def test_all_tokens_to_one_expert_matches_reference() -> None:
    """One expert takes every token, the others get none: right outputs and gradients (zero for idle experts)."""
    assert_parity(merge_ranks(world(_all_to_one_rank, 4)))


def _empty_ranks_rank(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    e = world_size
    return {
        "rank-without-tokens": parity_errors(make_config(e), [6, 0, 5, 7], seed=2),
        "two-ranks-without-tokens": parity_errors(make_config(e, activation="swiglu"), [0, 9, 0, 4], seed=3),
        "one-token-in-the-world": parity_errors(make_config(e, score_function="sigmoid"), [0, 0, 1, 0], seed=4),
        "one-token-capacity": parity_errors(
            make_config(e, capacity_factor=0.25), [0, 1, 0, 0], seed=5, per_rank_reference=True
        ),
    }


def test_empty_ranks_and_a_single_token_match_reference() -> None:
    """Ranks without tokens, a single token in the whole world: right answers, no hang."""
    assert_parity(merge_ranks(world(_empty_ranks_rank, 4)))


def _all_to_one_counts_rank(rank: int, world_size: int) -> list[int]:
    cfg = make_config(world_size, top_k=1, normalize_topk=False)
    layer = LargeEPMoE(cfg)
    layer.router.expert_bias[2] = 10.0
    layer(torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(rank)))
    return layer.last_stats.tokens_per_expert_E.tolist()


def test_all_to_one_load_is_counted_globally() -> None:
    assert world(_all_to_one_counts_rank, 4) == [[0, 0, 20, 0]] * 4


def _empty_world_rank(rank: int, world_size: int) -> dict[str, object]:
    layer = LargeEPMoE(make_config(world_size))
    # No token anywhere, one rank's input shaped [B, 0, H]: the world still runs forward and backward.
    x_empty = torch.zeros((2, 0, HIDDEN) if rank == 1 else (0, HIDDEN), requires_grad=True)
    y = layer(x_empty)
    y.sum().backward()
    dist.barrier()
    return {
        "shape": tuple(y.shape),
        "counts": layer.last_stats.tokens_per_expert_E.tolist(),
        "grad_shape": tuple(x_empty.grad.shape),
    }


def test_world_without_tokens_runs_forward_and_backward() -> None:
    for rank, r in enumerate(world(_empty_world_rank, 4)):
        assert r["shape"] == r["grad_shape"] == ((2, 0, HIDDEN) if rank == 1 else (0, HIDDEN))
        assert r["counts"] == [0, 0, 0, 0]


def test_weighted_combine_saves_only_the_rows_and_o_tk_numbers() -> None:
    """The combine's weighted sum keeps for its backward the received rows (their own dtype), the order and the
    weights: no float32 [T, K, H] copy. Its gradients equal those of the plain formula."""
    from largeep_plugin.layer.dispatcher import sum_over_k

    t, k, h = 64, 4, 32
    order_A = torch.randperm(t * k, generator=torch.Generator().manual_seed(0))[: t * k - 10].clone()
    rows_AH = torch.randn(order_A.numel(), h, dtype=torch.bfloat16, requires_grad=True)
    weights_TK = torch.rand(t, k, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        y_TH = sum_over_k(rows_AH, order_A, t, k, weights_TK)
    budget = rows_AH.nbytes + order_A.nbytes + weights_TK.nbytes
    assert sum(saved.values()) <= budget, (sum(saved.values()), budget)

    g_TH = torch.randn(t, h).bfloat16().float()  # exact in the bf16 output's gradient
    (y_TH.float() * g_TH).sum().backward()
    full = torch.zeros(t * k, h).index_copy(0, order_A, rows_AH.detach().float()).view(t, k, h)
    want_w = (full * g_TH.unsqueeze(1)).sum(-1)
    assert torch.allclose(weights_TK.grad, want_w, rtol=1e-5, atol=1e-5)
    want_rows = (weights_TK.detach().reshape(-1)[order_A].unsqueeze(-1) * g_TH[order_A // k])
    assert torch.allclose(rows_AH.grad.float(), want_rows, rtol=1e-2, atol=1e-2)
