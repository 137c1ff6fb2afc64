"""Behaviour of the performance model: monotonicity, overlap, physical bounds, the published-number validation
and the verdict on the source design's claims."""
from __future__ import annotations

import dataclasses

import pytest

from largeep_plugin.perfmodel.claims import check_claims
from largeep_plugin.perfmodel.decode import simulate_decode
from largeep_plugin.perfmodel.layout import parse_layout
from largeep_plugin.perfmodel.scenario import load_scenario
from largeep_plugin.perfmodel.specs import LinkSpec, load_cluster, load_model
from largeep_plugin.perfmodel.training import simulate_training
from largeep_plugin.perfmodel.validate import run_validation
from largeep_plugin.perfmodel.workload import DecodeWorkload, TrainingWorkload

LAYOUTS = ("ep16", "tp8pp2", "ep8dp2", "tp2ep8etp2", "tp4ep4dp4")
WORK = TrainingWorkload(seq_len=4096, global_batch=256, precision="fp16")


@pytest.fixture(scope="module")
def source():
    return load_model("source_model")


@pytest.fixture(scope="module")
def h100():
    return load_cluster("h100_2x8")


def _scaled(cluster, factor):
    def link(l):
        return LinkSpec(bandwidth_GB_per_s=l.bandwidth_GB_per_s * factor, latency_us=l.latency_us)
    return dataclasses.replace(cluster, intra_node=link(cluster.intra_node), inter_node=link(cluster.inter_node))


@pytest.mark.parametrize("overlap, chunks", [("none", 1), ("chunked", 4), ("cross_batch", 1)])
def test_more_bandwidth_is_never_slower(source, h100, overlap, chunks):
    work = dataclasses.replace(WORK, overlap=overlap, overlap_chunks=chunks)
    dec = DecodeWorkload(batch=64, context=4096, precision="fp16")
    for name in LAYOUTS:
        layout = parse_layout(name)
        steps = [simulate_training(source, _scaled(h100, f), layout, work).step_s for f in (0.1, 0.5, 1, 2, 10)]
        tpots = [simulate_decode(source, _scaled(h100, f), layout, dec).tpot_s for f in (0.1, 0.5, 1, 2, 10)]
        assert steps == sorted(steps, reverse=True), name
        assert tpots == sorted(tpots, reverse=True), name
        assert steps[0] > steps[-1] and tpots[0] > tpots[-1], name  # communication is on the critical path


@pytest.mark.parametrize("overlap, chunks", [("none", 1), ("chunked", 4), ("cross_batch", 1)])
def test_more_imbalance_is_never_faster(source, h100, overlap, chunks):
    for name in ("ep16", "ep8dp2", "tp2ep8etp2"):
        steps = [simulate_training(source, h100, parse_layout(name),
                                   dataclasses.replace(WORK, overlap=overlap, overlap_chunks=chunks,
                                                       imbalance=i)).step_s for i in (1.0, 1.2, 1.5, 2.0)]
        assert steps == sorted(steps) and steps[-1] > steps[0], name
        tpots = [simulate_decode(source, h100, parse_layout(name),
                                 DecodeWorkload(batch=256, context=1024, precision="fp16", imbalance=i)).tpot_s
                 for i in (1.0, 1.5, 2.0)]
        assert tpots == sorted(tpots), name
    # Without expert parallelism every GPU holds every expert: imbalance cannot matter.
    a, b = (simulate_training(source, h100, parse_layout("tp8pp2"), dataclasses.replace(WORK, imbalance=i)).step_s
            for i in (1.0, 2.0))
    assert a == b


def test_overlap_helps_and_more_chunks_help_more(source, h100):
    layout = parse_layout("ep16")
    none = simulate_training(source, h100, layout, WORK)
    chunked = [simulate_training(source, h100, layout, dataclasses.replace(WORK, overlap="chunked",
                                                                           overlap_chunks=c)) for c in (2, 4, 8, 16)]
    cross = simulate_training(source, h100, layout, dataclasses.replace(WORK, overlap="cross_batch"))
    steps = [none.step_s] + [r.step_s for r in chunked]
    assert steps == sorted(steps, reverse=True) and steps[-1] < steps[0]
    assert cross.step_s < none.step_s
    assert none.a2a_hidden_s == 0 and all(r.a2a_hidden_s > 0 for r in chunked)
    # The breakdown adds up to the step.
    for r in (none, cross, *chunked):
        assert sum(r.breakdown.values()) == pytest.approx(r.step_s)


def test_physical_bounds(source, h100):
    for name in LAYOUTS:
        layout = parse_layout(name)
        r = simulate_training(source, h100, layout, WORK)
        # Nothing runs faster than the GEMMs do: MFU stays below the GEMM efficiency.
        assert 0 < r.mfu < h100.efficiency.gemm_fraction("fp16")
        for batch in (1, 32, 512):
            d = simulate_decode(source, h100, layout, DecodeWorkload(batch=batch, context=10000, precision="fp16"))
            assert d.tpot_s > d.floor_s > 0


def test_validation_against_published_numbers():
    rows, fits = run_validation()
    by_role = {}
    for row in rows:
        by_role.setdefault(row.case.role, []).append(row)
    assert {r.case.name for r in by_role["validation"]} == {"mixtral-8x7b-bf16-64gpu", "deepseek-v3-fp8-1024gpu"}
    for row in by_role["validation"] + by_role["anchor"]:
        assert abs(row.error) < 0.30, (row.case.name, row.predicted_tflops, row.case.published_tflops)
    # The preset's cross_batch_overlap is the one fitted from the published Qwen3 speed-up.
    cluster = load_cluster("h100_2x8")
    (fitted,) = fits.values()
    assert fitted == pytest.approx(cluster.efficiency.cross_batch_overlap, abs=0.02)
    ds = next(r for r in rows if r.case.name == "deepseek-v3-fp8-1024gpu")
    assert ds.result.tokens_per_s / ds.case.layout.world == pytest.approx(ds.case.published_tokens_per_gpu, rel=0.3)


def test_source_claims_verdict():
    sc = load_scenario("source")
    checks = {c.layout: c for c in check_claims(sc)}
    ep, tp = checks["ep16"], checks["tp8pp2"]
    # 16 GPUs x 989 TFLOP/s over 34.18 GFLOP per token (top-2, S = 10000, causal).
    assert ep.ceiling_tokens_per_s == pytest.approx(16 * 989e12 / 34_181_480_448)
    assert ep.needed_mfu == pytest.approx(450_000 / ep.ceiling_tokens_per_s)
    assert ep.needed_mfu > 0.9 and ep.needed_mfu_top1 < ep.needed_mfu
    assert any("CANNOT HOLD" in v and "training" in v for v in ep.verdicts)
    assert any("PESSIMISTIC" in v for v in tp.verdicts)
    # Decode: 2.2 ms is below EP16's floor at context 10000; batch 1024 x 10000 does not fit anywhere.
    assert ep.floor_ms_batch1 > 2.2
    assert any("CANNOT HOLD at context 10000" in v for v in ep.verdicts)
    assert ep.decode_fits is False and tp.decode_fits is False
    # At batch 1, TP 8 splits every weight read over 8 GPUs: it is faster than EP 16, not 3.8x slower.
    assert tp.predicted_ms_batch1 < ep.predicted_ms_batch1
    # Both layouts are compute bound: the model sees nothing like the claimed 3.75x training speed-up.
    assert 0.8 < ep.predicted_tokens_per_s / tp.predicted_tokens_per_s < 1.5
