"""The overlap pipeline: chunked equals unchunked (values and gradients), the schedule really overlaps, the chunk
count is clamped to the tokens, bad settings are refused.

Layer-level comparisons run the layer twice with the same seeded weights and tokens: once with overlap_chunks = 1
(the plain dispatcher, itself checked against the dense reference in test_layer_parity.py) and once chunked.
Compared: output, input gradient, router weight gradient, every gradient of the rank's expert.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import largeep_plugin.layer.overlap as overlap
from conftest import HIDDEN, global_batch, gpu, make_config, rank_slice, rel_err, world
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.overlap import chunk_of_tokens, effective_chunks

TOL = 1e-5


def layer_run(
    config: LargeEPConfig, counts: list[int], seed: int, ranks_per_node: int | None = None, **layer_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Forward + backward of one rank's slice of a seeded global batch; returns output and gradients.
    ``layer_kwargs`` go to ``LargeEPMoE`` (e.g. ``node_groups``)."""
    rank = dist.get_rank()
    x_GH, g_GH = global_batch(counts, config.hidden_size, seed)
    layer = LargeEPMoE(config, ranks_per_node=ranks_per_node, **layer_kwargs)
    x = x_GH[rank_slice(counts, rank)].clone().requires_grad_(True)
    y = layer(x)
    (y * g_GH[rank_slice(counts, rank)]).sum().backward()
    out = {"y": y.detach(), "dx": x.grad, "router": layer.router.weight.grad}
    out.update({f"expert.{n}": p.grad for n, p in layer.expert.named_parameters()})
    return out


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative errors per quantity, plus "scale:<quantity>" = max |want| (to show it is not all zeros)."""
    errs = {k: rel_err(got[k], want[k]) for k in want}
    errs.update({f"scale:{k}": float(want[k].abs().max()) if want[k].numel() else 0.0 for k in want})
    return errs


def assert_close(results: list[dict[str, dict[str, float]]]) -> None:
    """Every error <= TOL on every rank; every quantity non-zero on at least one rank (a rank without tokens
    has no output and no router gradient of its own)."""
    bad, flat = {}, {}
    for rank, per_case in enumerate(results):
        for case, errs in per_case.items():
            wrong = {k: v for k, v in errs.items() if not k.startswith("scale:") and not v <= TOL}
            if wrong:
                bad[f"rank{rank}/{case}"] = wrong
    for case in results[0]:
        for key in [k for k in results[0][case] if k.startswith("scale:")]:
            if max(r[case][key] for r in results) < 1e-3:
                flat[case] = key
    assert not bad, f"chunked layer differs from the unchunked one: {bad}"
    assert not flat, f"compared quantities are all zero, the comparison means nothing: {flat}"


def _chunked_rank(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    e = world_size
    counts = [5 + 7 * r % 11 for r in range(world_size)]
    counts[1] = 0  # a rank without tokens still takes part in every chunk's collectives
    cases: dict[str, Any] = {
        "gelu-top2": dict(top_k=2),
        "swiglu-sigmoid-top3": dict(activation="swiglu", score_function="sigmoid", top_k=3),
        "capacity-0.7": dict(top_k=2, capacity_factor=0.7),
        "linear-bias-top1": dict(top_k=1, linear_bias=True, normalize_topk=False),
    }
    out = {}
    for i, (name, fields) in enumerate(cases.items()):
        want = layer_run(make_config(e, **fields), counts, seed=i)
        for chunks in (2, 3, 8):
            got = layer_run(make_config(e, overlap_chunks=chunks, **fields), counts, seed=i)
            out[f"{name}-chunks{chunks}"] = compare(got, want)
    return out


@pytest.mark.parametrize("ep", [4, 8])
def test_chunked_equals_unchunked(ep: int) -> None:
    assert_close(world(_chunked_rank, ep))


def _clamp_rank(rank: int, world_size: int) -> dict[str, Any]:
    """Every rank has at most 3 tokens and asks for 8 chunks: 3 chunks run, results unchanged."""
    counts = [3, 1, 0, 2][:world_size]
    calls = []
    real = overlap.start_all_to_all_lanes

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    overlap.start_all_to_all_lanes = spy
    try:
        got = layer_run(make_config(world_size, overlap_chunks=8), counts, seed=3)
    finally:
        overlap.start_all_to_all_lanes = real
    want = layer_run(make_config(world_size), counts, seed=3)
    return {"errs": compare(got, want), "exchanges": len(calls)}


def test_more_chunks_than_tokens_is_clamped_to_the_largest_token_count() -> None:
    results = world(_clamp_rank, 4)
    assert_close([{"clamped": r["errs"]} for r in results])
    # min(8, largest T = 3) chunks, each with one dispatch and one combine exchange forward and backward.
    assert [r["exchanges"] for r in results] == [3 * 4] * 4


def test_chunk_sizes_and_clamp_rule() -> None:
    assert torch.bincount(chunk_of_tokens(10, 4), minlength=4).tolist() == [3, 3, 2, 2]
    assert torch.bincount(chunk_of_tokens(3, 8), minlength=8).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert chunk_of_tokens(0, 2).numel() == 0
    assert effective_chunks(8, [3, 1, 0]) == 3
    assert effective_chunks(4, [100, 7]) == 4
    assert effective_chunks(4, [0, 0]) == 1  # nobody has tokens: one empty chunk, like the unchunked path


def test_bad_chunk_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap_chunks=0"):
        LargeEPConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, overlap_chunks=0)
    with pytest.raises(ValueError, match="overlap_chunks=-2"):
        chunk_of_tokens(5, -2)
    with pytest.raises(ValueError, match="overlap_chunks"):
        LargeEPConfig.from_dict(dict(hidden_size=8, ffn_hidden_size=8, num_experts=2, overlap_chunks=2.5))


class _Logger:
    """Records the order of exchange starts, waits and expert calls of the pipeline, and the gloo work handles
    each start posted (``works[n]``: those of exchange n), to tell whether an exchange progressed on its own."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.works: list[list[Any]] = []
        self._posted: list[Any] = []

    def post(self, real: Any) -> Any:
        """Wraps ``dist.all_to_all_single``: keeps every asynchronous work handle."""
        def spy(*args: Any, **kwargs: Any) -> Any:
            work = real(*args, **kwargs)
            if kwargs.get("async_op"):
                self._posted.append(work)
            return work
        return spy

    def start(self, real: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            first = len(self._posted)
            pending = real(*args, **kwargs)
            n = len(self.works)
            self.works.append(self._posted[first:])
            self.log.append(f"start{n}")
            inner = pending.wait

            def wait() -> Any:
                self.log.append(f"wait{n}")
                return inner()

            pending.wait = wait
            return pending
        return spy

    def in_flight(self) -> list[int]:
        """Exchanges started and not yet waited for."""
        return [n for n in range(len(self.works)) if f"wait{n}" not in self.log]

    def completes_unwaited(self, n: int, within_s: float = 5.0) -> bool:
        """Whether exchange n finishes while nobody waits for it (the backend moves it on its own threads)."""
        deadline = time.monotonic() + within_s
        while not all(w.is_completed() for w in self.works[n]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return bool(self.works[n])


def _schedule_rank(rank: int, world_size: int) -> dict[str, Any]:
    logger = _Logger()
    real_start, real_post = overlap.start_all_to_all_lanes, dist.all_to_all_single
    overlap.start_all_to_all_lanes = logger.start(real_start)
    dist.all_to_all_single = logger.post(real_post)
    progressed: dict[int, bool] = {}
    try:
        layer = LargeEPMoE(make_config(world_size, overlap_chunks=3))
        inner = layer.expert.forward

        def expert(rows: torch.Tensor) -> torch.Tensor:
            logger.log.append("expert")
            if "backward" not in logger.log:
                # The expert's time is what overlap hides: every exchange in flight must finish within it, with
                # no wait called (a schedule that only posts at wait() would leave them pending).
                for n in logger.in_flight():
                    progressed[n] = logger.completes_unwaited(n)
            return inner(rows)

        layer.expert.forward = expert
        x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        logger.log.append("forward")
        y = layer(x)
        logger.log.append("backward")
        y.sum().backward()
    finally:
        overlap.start_all_to_all_lanes, dist.all_to_all_single = real_start, real_post
    return {"log": logger.log, "progressed": progressed}


def test_schedule_keeps_next_dispatch_and_previous_combine_in_flight_during_the_expert() -> None:
    result = world(_schedule_rank, 2)[0]
    log = result["log"]
    fwd = log[log.index("forward") + 1: log.index("backward")]
    # Exchanges are numbered in start order; forward: D0 D1 | E0 | C0 D2 | E1 | C1 | E2 | C2.
    assert fwd == ["start0", "wait0", "start1", "expert", "start2", "wait1", "start3", "expert", "start4",
                   "wait2", "wait3", "expert", "start5", "wait4", "wait5"], fwd
    # While the expert of chunk 1 runs, chunk 2's dispatch (start3) and chunk 0's combine (start2) are in flight:
    # both started before and waited after it ...
    e1 = [i for i, e in enumerate(fwd) if e == "expert"][1]
    assert fwd.index("start2") < e1 < fwd.index("wait2") and fwd.index("start3") < e1 < fwd.index("wait3")
    # ... and they really move meanwhile: each exchange in flight during an expert completed before its wait.
    assert result["progressed"] == {1: True, 2: True, 3: True, 4: True}, result["progressed"]
    # Backward: the expert's backward is autograd inside the pipeline, so check the same interleaving of the
    # reverse exchanges: 6 exchanges, the second chunk's reverse combine starts before the first one's
    # reverse dispatch is waited for.
    bwd = log[log.index("backward") + 1:]
    starts = [e for e in bwd if e.startswith("start")]
    assert len(starts) == 6
    assert bwd.index("start7") < bwd.index("wait8") and bwd.index("start8") < bwd.index("wait7"), bwd


@gpu
def test_cuda_streams_path_matches_unchunked() -> None:
    """World size 1 on the GPU: exchanges are copies on the side stream, ordered by events. Sigmoid scores without
    renormalisation give every token its own combine weight (top-1 renormalised would make it 1) and the router a
    gradient, so a weight applied to the wrong row or chunk shows."""
    cfg = make_config(1, top_k=1, score_function="sigmoid", normalize_topk=False)
    x_TH = torch.randn(64, HIDDEN, device="cuda")
    runs = []
    for chunks in (1, 4):
        layer = LargeEPMoE(cfg.replace(overlap_chunks=chunks)).to("cuda")
        x = x_TH.clone().requires_grad_(True)
        y = layer(x)
        y.square().sum().backward()
        runs.append({"y": y.detach().cpu(), "dx": x.grad.cpu(), "router": layer.router.weight.grad.cpu(),
                     **{f"expert.{n}": p.grad.cpu() for n, p in layer.expert.named_parameters()}})
    assert_close([{"cuda-chunks4": compare(runs[1], runs[0])}])
