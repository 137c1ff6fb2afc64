"""``largeep bench balance`` (tools/balance_bench.py) and the turn-taking timer under it (tools/critical_path.py):
their arithmetic and their fairness, not their speed.

* ``exclusive_seconds``: the ranks really take turns (their timed intervals do not overlap) and every rank gets
  every rank's time;
* the benchmark at EP 4: both variants see the same tokens and weights (their outputs equal, their expert load
  equal step by step), the dynamic variant has clones from step 1 and a lower rank imbalance, the rows per slot
  it times add up to the assignments, and the summary is the mean of the steps it says.
"""
from __future__ import annotations

import time

import pytest

from conftest import world
from largeep_plugin.tools.balance_bench import BalanceBenchSettings, format_report, run_balance_bench, summary


def _turns(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from largeep_plugin.tools.critical_path import exclusive_seconds

    spans = []

    def work() -> None:
        start = time.monotonic()
        time.sleep(0.05 * (rank + 1))
        spans.append((start, time.monotonic()))

    times = exclusive_seconds(work, repeats=2)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, spans)
    return {"times": times, "spans": gathered}


def test_ranks_take_turns() -> None:
    results = world(_turns, 3)
    times = results[0]["times"]
    assert all(r["times"] == times for r in results)
    for rank, t in enumerate(times):
        assert 0.05 * (rank + 1) <= t < 0.05 * (rank + 1) + 0.5, times
    spans = sorted(s for per_rank in results[0]["spans"] for s in per_rank)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two ranks were timed at once"


@pytest.fixture(scope="module")
def bench() -> tuple[BalanceBenchSettings, list[dict]]:
    settings = BalanceBenchSettings(hidden_size=32, ffn_hidden_size=64, tokens_per_rank=96, skew=0.5, steps=4,
                                    repeats=1)
    return settings, run_balance_bench(settings, [4], timeout=300.0)


def test_both_variants_train_the_same_model_on_the_same_tokens(bench) -> None:
    _, results = bench
    steps = results[0]["steps"]
    for r in steps:
        assert r["output_difference"] < 1e-5, r
        assert r["static"]["expert_imbalance"] == pytest.approx(r["dynamic"]["expert_imbalance"]), r
        assert r["static"]["clones"] == 0
    assert steps[0]["dynamic"]["clones"] == 0 and all(r["dynamic"]["clones"] > 0 for r in steps[1:])
    assert steps[0]["static"]["expert_imbalance"] > 1.5  # the skew is real
    assert all(r["dynamic"]["rank_imbalance"] < r["static"]["rank_imbalance"] for r in steps[1:])
    # Every assignment is a row on some slot: T * K per rank over the world.
    assert all(sum(r[v]["rows"]) == 4 * 96 * 2 for r in steps for v in ("static", "dynamic"))
    # What rank 0 timed is what its slots received in the layer's own dispatch (LoadStats.rows_per_rank_R).
    assert all(r[v]["timed_rows"] == r[v]["rows"][0] for r in steps for v in ("static", "dynamic"))


def test_summary_and_report(bench) -> None:
    settings, results = bench
    res = results[0]
    sm = summary(res, skip=2)
    later = res["steps"][2:]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert sm["static_busiest_s"] == pytest.approx(mean([r["static"]["busiest_expert_s"] for r in later]))
    assert sm["speedup"] == pytest.approx(sm["static_busiest_s"] / sm["dynamic_busiest_s"])
    assert sm["dynamic_over_ideal"] == pytest.approx(sm["dynamic_busiest_s"] / res["ideal_expert_s"])
    text = format_report(settings, results)
    assert "EP 4" in text and "steps 2+" in text and "target" not in text  # targets are stated at EP 16 only
