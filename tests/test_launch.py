"""run_world: results in rank order, a rank's exception with its traceback, hanging or dying ranks killed."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from largeep_plugin.tools.launch import WorldError, run_world


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


def test_a_rank_exception_reaches_the_caller_with_its_traceback() -> None:
    with pytest.raises(WorldError) as info:
        run_world(_one_rank_fails, 3, timeout=60)
    msg = str(info.value)
    assert "rank 2" in msg and "boom on rank 2" in msg and "KeyError" in msg
    assert "Traceback" in msg and "_failing_helper" in msg and "_one_rank_fails" in msg


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


def _one_rank_dies(rank: int, world_size: int) -> int:
    dist.barrier()  # both ranks are fully connected: the death is the only thing that goes wrong
    if rank == 1:
        os._exit(7)
    time.sleep(600)
    return rank


def test_a_dying_rank_is_reported() -> None:
    with pytest.raises(WorldError, match=r"rank\(s\) \[1\] died.*7"):
        run_world(_one_rank_dies, 2, timeout=60)


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        run_world(_identity_rank, 0)
