"""The critical-path timing (tools/critical_path.py) on work whose times are known: ranks sleep, so the numbers do
not depend on how busy the machine is.

* ``TurnTaking`` around a step of sleeps and collectives: no two ranks are ever in a segment at once, every
  collective (however it is called) ends a segment, the critical path is the sum over segments of the slowest
  rank's sleep (and the balanced figure the sum of the means), and the all-to-all bytes per (source, destination)
  are what was sent;
* the ranks enter each collective together (released by a barrier when the last has finished its segment): the
  arrivals' spread is the barrier's, not the ranks' compute differences;
* the same step without turns (``turns=False``): its wall clock agrees with the critical path (the mode measures
  what a machine with a core per rank would show), and it is taken apart alike: the same segments, the arrivals
  spread by the compute differences;
* an asynchronous collective is waited for where it is called (with and without turns), and only then;
* ranks that run different collectives are an error, not a wrong number (where the counts of collectives differ,
  the token cannot go round: that ends in the group's timeout).
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from conftest import world
from largeep_plugin.tools.critical_path import StepTimes, TurnTaking, median_step, typical_step

SLEEP = {0: (0.06, 0.02, 0.03), 1: (0.02, 0.08, 0.03), 2: (0.04, 0.04, 0.09)}  # per rank, per segment


def _step(rank: int, world_size: int, spans: list[tuple[float, float]]) -> None:
    import torch.distributed as dist

    def work(seconds: float) -> None:
        start = time.monotonic()
        time.sleep(seconds)
        spans.append((start, time.monotonic()))

    work(SLEEP[rank][0])
    dist.all_reduce(torch.ones(4))
    work(SLEEP[rank][1])
    send = torch.zeros(sum(range(1, world_size + 1)), 3)   # rank r sends d + 1 rows of 3 floats to rank d
    out = torch.zeros((rank + 1) * world_size, 3)
    dist.all_to_all_single(out, send, [rank + 1] * world_size, [d + 1 for d in range(world_size)])
    work(SLEEP[rank][2])


def _rank(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    clock = TurnTaking()
    together = TurnTaking(turns=False)
    spans: list[tuple[float, float]] = []
    with clock:
        _step(rank, world_size, spans)
    times = clock.gathered()
    every: list = [None] * world_size
    dist.all_gather_object(every, spans)
    dist.barrier()
    start = time.perf_counter()
    with together:
        _step(rank, world_size, [])     # the same step without turns: the ranks sleep side by side
    dist.barrier()
    wall = time.perf_counter() - start
    side = together.gathered()
    bad = "no error"
    try:
        with clock:  # one collective each, on a group of its own, but not the same one everywhere
            if rank == 0:
                dist.all_reduce(torch.ones(1), group=solo[rank])
            else:
                dist.broadcast(torch.ones(1), src=dist.get_rank(), group=solo[rank])
        clock.gathered()
    except ValueError as err:
        bad = str(err)
    return {"times": times, "spans": every, "wall": wall, "side": side, "bad": bad}


solo: dict[int, object] = {}


def _world(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    for r in range(world_size):  # every rank creates every group, in one order
        group = dist.new_group([r])
        if r == rank:
            solo[rank] = group
    return _rank(rank, world_size)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return world(_world, 3)


def test_ranks_never_compute_at_once(results) -> None:
    spans = sorted(s for per_rank in results[0]["spans"] for s in per_rank)
    assert len(spans) == 9
    assert all(a[1] <= b[0] + 1e-4 for a, b in zip(spans, spans[1:])), "two ranks were in a segment at once"


def test_critical_path_is_the_slowest_rank_per_segment(results) -> None:
    t: StepTimes = results[0]["times"]
    assert t.names == ("allreduce", "alltoall_base") or t.names == ("allreduce", "all_to_all_single"), t.names
    assert len(t.segments_RS) == 3 and all(len(row) == 3 for row in t.segments_RS)
    want = sum(max(SLEEP[r][k] for r in range(3)) for k in range(3))      # 0.06 + 0.08 + 0.09
    mean = sum(sum(SLEEP[r][k] for r in range(3)) / 3 for k in range(3))
    assert want <= t.compute < want + 0.05, (t.compute, want)
    assert mean <= t.balanced_compute < mean + 0.05
    assert t.critical_path == pytest.approx(t.compute + t.communication)
    assert max(SLEEP[r][0] + SLEEP[r][1] + SLEEP[r][2] for r in range(3)) <= t.busiest_rank_compute <= t.compute
    # Bytes: rank a sent d + 1 rows of 3 float32 to rank d.
    assert t.sent_bytes_RR == tuple(tuple((d + 1) * 12 for d in range(3)) for _ in range(3))
    assert t.internode_bytes(1) == sum((d + 1) * 12 for a in range(3) for d in range(3) if a != d)
    assert median_step([t])["critical_path_s"] == t.critical_path


def test_it_agrees_with_the_wall_clock_when_nothing_is_shared(results) -> None:
    t, wall = results[0]["times"], results[0]["wall"]
    assert abs(t.critical_path - wall) <= 0.1 * wall, (t.critical_path, wall)


def test_ranks_enter_each_collective_together(results) -> None:
    # Under the turns rank 2 finishes its first segment 0.04 s of sleep after rank 0 started its own wait: without
    # the release every rank but the last would wait inside the collective (and could start its transfer).
    t: StepTimes = results[0]["times"]
    assert len(t.skew_S1) == 2 and max(t.skew_S1) < 0.02, t.skew_S1


def test_without_turns_the_step_is_taken_apart_alike(results) -> None:
    t, side = results[0]["times"], results[0]["side"]
    assert side.names == t.names
    want = sum(max(SLEEP[r][k] for r in range(3)) for k in range(3))
    assert want <= side.compute < want + 0.05, (side.compute, want)
    # Arrivals spread by the compute: 0.06 / 0.02 / 0.04 s before the first collective, 0.02 / 0.08 / 0.04 s more
    # before the second (every rank leaves the first together).
    assert side.skew_S1[0] >= 0.035 and side.skew_S1[1] >= 0.055, side.skew_S1


def test_different_collectives_are_an_error(results) -> None:
    assert all("ran different collectives" in r["bad"] for r in results), [r["bad"] for r in results]


def _async_world(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    done = {}
    before = torch._C._distributed_c10d.ProcessGroup.__dict__["allreduce"]
    clocks = {"plain": contextlib.nullcontext(), "turns": TurnTaking(), "together": TurnTaking(turns=False)}
    for mode, clock in clocks.items():
        dist.barrier()
        if rank == 1:
            time.sleep(1.0)          # rank 0's collective cannot finish before rank 1 calls it
        with clock:
            x = torch.ones(2) * (rank + 1)
            work = dist.all_reduce(x, async_op=True)
            done[mode] = work.is_completed()
        work.wait()
        if mode != "plain":
            clock.gathered()
        done[mode + "_sum"] = x.tolist()
    done["restored"] = torch._C._distributed_c10d.ProcessGroup.__dict__["allreduce"] is before
    return done


def test_asynchronous_collectives_are_waited_for_where_they_are_called() -> None:
    got = world(_async_world, 2)
    assert got[0]["plain"] is False, got       # left to run beside the caller's work
    assert got[0]["turns"] is True and got[0]["together"] is True, got       # done when the call returns
    assert got[0]["plain_sum"] == got[0]["turns_sum"] == got[0]["together_sum"] == [3.0, 3.0]
    assert all(r["restored"] for r in got)


def test_the_typical_step_takes_medians_per_rank_and_segment() -> None:
    def step(a: float, b: float, c: float) -> StepTimes:
        return StepTimes(segments_RS=((a, 1.0), (b, 1.0)), comm_S1=(c,), names=("allreduce",),
                         sent_bytes_RR=((0, 0), (0, 0)))

    # Rank 0 has one slow step, rank 1 another: per step the slowest rank costs 5 each time; typically neither is.
    steps = [step(5.0, 1.0, 0.1), step(1.0, 5.0, 0.2), step(1.0, 1.0, 0.3)]
    typical = typical_step(steps)
    assert typical.segments_RS == ((1.0, 1.0), (1.0, 1.0)) and typical.comm_S1 == (0.2,)
    assert median_step(steps)["critical_path_s"] == pytest.approx(2.2)
    assert median_step(steps)["critical_path_s"] < sorted(s.critical_path for s in steps)[1]
    other = StepTimes(segments_RS=((1.0,), (1.0,)), comm_S1=(), names=(), sent_bytes_RR=((0, 0), (0, 0)))
    assert typical_step([steps[0], other]) is None      # segments that do not line up: per-step medians
    assert median_step([steps[0], other, steps[2]])["critical_path_s"] == pytest.approx(steps[2].critical_path)


def _sharing(rank: int, world_size: int, lock_path: str) -> dict:
    import fcntl

    from largeep_plugin.tools.critical_path import core_sharing

    def alone_or_not() -> None:  # nothing shared: a rank's time is its own, alone or not
        time.sleep(0.1)

    def one_at_a_time() -> None:  # a resource the ranks share (a file lock): at once, the second waits the first
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            time.sleep(0.1)
            fcntl.flock(f, fcntl.LOCK_UN)

    return {"free": core_sharing(alone_or_not, rounds=3), "shared": core_sharing(one_at_a_time, rounds=3)}


def test_core_sharing_says_how_much_ranks_at_once_slow_each_other(tmp_path) -> None:
    results = world(_sharing, 2, str(tmp_path / "lock"))
    assert results[0] == results[1]  # every rank returns the world's figures
    free, shared = results[0]["free"], results[0]["shared"]
    assert free["rounds"] == shared["rounds"] == 3 and len(free["alone_ms"]) == len(free["together_ms"]) == 2
    assert 0.9 < free["slowdown"] < 1.3
    assert all(95 < ms < 130 for ms in free["alone_ms"] + free["together_ms"] + shared["alone_ms"])
    # At once, one rank waits for the other's 0.1 s: the worst rank takes twice its time alone.
    assert 1.7 < shared["slowdown"] < 2.5
    assert max(shared["together_ms"]) > 190
    with pytest.raises(ValueError, match="rounds=0"):
        from largeep_plugin.tools.critical_path import core_sharing

        core_sharing(lambda: None, rounds=0)
