"""Lanes of different dtypes travel as one all-to-all: a float32 metadata lane rides in a bf16 token buffer bit for
bit (the node-batched dispatch sends [weights | local destinations] with every stage-1 row), forward and backward."""
from __future__ import annotations

from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from conftest import world


def _lanes_rank(rank: int, world_size: int) -> dict[str, Any]:
    from largeep_plugin.layer.comm import all_to_all, all_to_all_lanes, start_all_to_all_lanes

    gen = torch.Generator().manual_seed(rank)
    send = [1 + rank, 2]  # rows to rank 0, rank 1
    recv = [1 + r if rank == 0 else 2 for r in range(world_size)]
    n = sum(send)
    rows = torch.randn(n, 6, generator=gen).bfloat16().requires_grad_(True)
    meta = (torch.randn(n, 3, generator=gen) * 1e-3 + rank).requires_grad_(True)  # float32, not bf16-exact
    calls = []
    real = dist.all_to_all_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    with mock.patch.object(dist, "all_to_all_single", counting):
        got_rows, got_meta = all_to_all_lanes([rows, meta], recv, send, None)
        forward_calls = list(calls)
        g_rows = torch.randn(got_rows.shape, generator=gen).bfloat16()
        g_meta = torch.randn(got_meta.shape, generator=gen)
        ((got_rows.float() * g_rows.float()).sum() + (got_meta * g_meta).sum()).backward()
        backward_calls = calls[len(forward_calls):]
        pending = start_all_to_all_lanes([rows.detach(), meta.detach()], recv, send, None).wait()
    # The same exchange one lane at a time, as the reference.
    want_rows = all_to_all(rows.detach(), recv, send, None)
    want_meta = all_to_all(meta.detach(), recv, send, None)
    want_g_rows = all_to_all(g_rows, send, recv, None)
    want_g_meta = all_to_all(g_meta, send, recv, None)
    return {
        "calls": (forward_calls, backward_calls),
        "exact": [torch.equal(got_rows, want_rows), torch.equal(got_meta, want_meta),
                  torch.equal(rows.grad, want_g_rows), torch.equal(meta.grad, want_g_meta),
                  torch.equal(pending[0], want_rows), torch.equal(pending[1], want_meta)],
        "dtypes": (got_rows.dtype, got_meta.dtype, rows.grad.dtype, meta.grad.dtype),
    }


def test_mixed_dtype_lanes_travel_as_one_collective() -> None:
    for r in world(_lanes_rank, 2):
        assert r["calls"] == ([torch.bfloat16], [torch.bfloat16]), r["calls"]
        assert all(r["exact"]), r["exact"]
        assert r["dtypes"] == (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32)
