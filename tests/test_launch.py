"""run_world: results in rank order; a failure named in one line per rank, the rank that died first; hanging ranks
killed at the timeout; no rank outlives its parent, whether it was stopped (SIGTERM, SIGHUP) or killed (SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from largeep_plugin.tools.launch import VERBOSE_ENV, WorldError, run_world
from largeep_plugin.tools.rank_report import RankOutcome, describe_failure, error_outcome


def _identity_rank(rank: int, world_size: int, delay: float) -> tuple[int, int, int, float, int]:
    # Later ranks finish first, so the results arrive out of order.
    time.sleep(delay * (world_size - 1 - rank))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return rank, dist.get_rank(), dist.get_world_size(), float(t), torch.get_num_threads()


def test_results_come_back_in_rank_order() -> None:
    results = run_world(_identity_rank, 4, args=(0.15,), timeout=60)
    assert [r[:3] for r in results] == [(r, r, 4) for r in range(4)]
    assert all(r[3] == 10.0 for r in results)  # 1 + 2 + 3 + 4: the ranks really talk to each other
    assert all(r[4] == 1 for r in results)


def _failing_helper(rank: int) -> None:
    raise KeyError(f"boom on rank {rank}")


def _one_rank_fails(rank: int, world_size: int) -> int:
    if rank == 2:
        _failing_helper(rank)
    return rank


def test_a_rank_exception_is_one_line_with_the_traceback_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with pytest.raises(WorldError) as info:
        run_world(_one_rank_fails, 3, timeout=60)
    msg = str(info.value)
    assert msg.splitlines()[:2] == [
        "world of 3 ranks failed: rank 2 raised KeyError",
        f"  rank 2: KeyError: 'boom on rank 2' (at test_launch.py:{_failing_helper.__code__.co_firstlineno + 1} "
        "in _failing_helper)",
    ], msg
    assert "Traceback" not in msg and info.value.failed_rank == 2
    kept = info.value.tracebacks[2]
    assert "Traceback" in kept and "_failing_helper" in kept and "_one_rank_fails" in kept
    # Asked for, the whole traceback is in the message too.
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with pytest.raises(WorldError) as info:
        run_world(_one_rank_fails, 3, timeout=60)
    assert "Traceback" in str(info.value) and "_one_rank_fails" in str(info.value)


def _one_rank_hangs(rank: int, world_size: int, pid_dir: str) -> int:
    Path(pid_dir, str(rank)).write_text(str(os.getpid()))
    if rank == 1:
        time.sleep(600)
    return rank


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hanging_rank_is_killed_at_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WorldError, match=r"timed out.*ranks \[1\]"):
        run_world(_one_rank_hangs, 2, args=(str(tmp_path),), timeout=6)
    assert time.monotonic() - start < 60, "the timeout did not stop the world"
    pids = [int((tmp_path / str(r)).read_text()) for r in range(2)]
    assert not any(_alive(p) for p in pids), "a rank outlived run_world"


def _one_rank_dies(rank: int, world_size: int, how: str) -> int:
    dist.barrier()  # all ranks are fully connected: the death is the only thing that goes wrong
    if rank == 1:
        if how == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(7)
    t = torch.ones(1)
    dist.all_reduce(t)  # the survivors lose rank 1 here, within milliseconds, often before its death is seen
    time.sleep(600)
    return rank


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_the_rank_that_died_is_named_first(how: str) -> None:
    with pytest.raises(WorldError) as info:
        run_world(_one_rank_dies, 4, args=(how,), timeout=60, grace=10)
    err, lines = info.value, str(info.value).splitlines()
    what = "died: killed by SIGKILL" if how == "SIGKILL" else "died: exited with status 7 without a result"
    assert lines[0] == f"world of 4 ranks failed: rank 1 {what}" and err.failed_rank == 1, str(err)
    assert lines[1] == f"  rank 1: {what}", str(err)
    assert err.exit_codes == {1: -signal.SIGKILL if how == "SIGKILL" else 7}
    # Then every survivor, one line each (the error it got, or stopped if it never noticed): no traceback wall.
    assert sorted(int(line.split()[1].rstrip(":")) for line in lines[2:] if line.startswith("  rank ")) == [0, 2, 3]
    assert "Traceback" not in str(err) and len(lines) <= 6, str(err)


_PARENT = """
import os, sys, time
from largeep_plugin.tools.launch import run_world

def rank_main(rank, world_size, pid_dir):
    open(os.path.join(pid_dir, str(rank)), "w").write(str(os.getpid()))
    time.sleep(600)

run_world(rank_main, 3, args=(sys.argv[1],), timeout=600)
"""


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time): tells a process from a later one that reuses its pid; None once
    the process is gone or a zombie (dead, only not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_no_rank_outlives_its_parent(tmp_path: Path, signum: signal.Signals) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    # stderr to a file, not a pipe: orphaned ranks would hold a pipe open and hang the read.
    with open(tmp_path / "stderr", "w") as err:
        parent = subprocess.Popen([sys.executable, str(script), str(pid_dir)], stderr=err)
    ranks: dict[int, str | None] = {}
    # Deadlines for a machine whose cores are all busy (the suite beside other work): a parent that imports torch
    # leaves in about 1.5 s on two cores shared with three busy processes, and in tens of seconds when many more
    # share them; they bound a failure, a passing run never waits for them.
    try:
        deadline = time.monotonic() + 180
        while len(list(pid_dir.iterdir())) < 3 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        time.sleep(0.2)  # the last pid file may be half written
        ranks = {int(f.read_text()): _start_time(int(f.read_text())) for f in pid_dir.iterdir()}
        assert len(ranks) == 3 and all(ranks.values()), (ranks, parent.poll())
        parent.send_signal(signum)
        parent.wait(timeout=120)
        deadline = time.monotonic() + 60
        alive = list(ranks)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid, started in ranks.items() if _start_time(pid) == started]
            time.sleep(0.1)
        assert not alive, f"ranks {alive} outlived their parent (killed by {signum.name})"
        if signum != signal.SIGKILL:  # the parent got to say why it stopped
            stderr = (tmp_path / "stderr").read_text()
            assert f"WorldInterrupted: interrupted by {signum.name}" in stderr, stderr
    finally:
        for pid, started in ranks.items():  # whatever happened, leave nothing behind
            if started is not None and _start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)


def test_world_size_and_timeout_are_checked() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        run_world(_identity_rank, 0)
    with pytest.raises(ValueError, match="timeout=0"):
        run_world(_identity_rank, 2, timeout=0)


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    try:
        next(iter(()))
    except StopIteration as exc:
        message = error_outcome(exc)
    outcomes = {1: RankOutcome.from_message(message, 0.0), 0: RankOutcome.from_message(("ok", 5), 0.1)}
    text, blamed = describe_failure(outcomes, [2], 3, 5.0, verbose=False, hint_env=VERBOSE_ENV)
    here = test_an_exception_without_a_message_is_named_by_its_type
    assert blamed == 1 and text.splitlines()[:3] == [
        "world of 3 ranks failed: rank 1 raised StopIteration",
        f"  rank 1: StopIteration (at test_launch.py:{here.__code__.co_firstlineno + 2} in {here.__name__})",
        "  rank 2: still running 5s after the first failure; stopped",
    ], text


def _thread_cores(rank: int, world_size: int) -> tuple[int, list[set[int]]]:
    """The cores every thread of this rank may run on (gloo's threads, started by init_process_group, included)."""
    dist.all_reduce(torch.ones(1))  # gloo's threads are up and have worked
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    return len(tids), [os.sched_getaffinity(t) for t in tids]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux's sched_getaffinity")
def test_pin_cores_binds_each_rank_and_its_threads_to_its_own_core() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    pinned = run_world(_thread_cores, 2, pin_cores=True, timeout=60)
    for rank, (threads, every) in enumerate(pinned):
        assert threads > 1  # the check covers gloo's threads, not only the main one
        assert every == [{cores[rank]}] * threads
    # More ranks than cores: nothing pinned; and without pin_cores, nothing pinned either.
    for world, pin in ((len(cores) + 1, True), (2, False)):
        for _, every in run_world(_thread_cores, world, pin_cores=pin, timeout=60):
            assert all(c == set(cores) for c in every)
