"""The pieces every side-by-side benchmark shares: interleaved timing, peak memory per variant, the JSON and the chart.

    seconds = interleaved_seconds({"a": step_a, "b": step_b}, warmup=2, iters=5)   # inside a rank of a world
    growth = peak_growth_mib(lambda: step_a())                                      # MiB, or None
    paths = write_json_and_chart("runs/x", "x_bench", payload, rows, "title", group_of=lambda r: f"EP {r['ep']}")

Used by ``tools/layer_bench.py`` (one MoE layer) and ``integrations/hf/bench.py`` (whole Hugging Face models).

Timing: variants are interleaved (iteration i of every variant runs before iteration i + 1 of any), so that load
from outside the benchmark falls on all of them alike; each step sits between two barriers of the world, so the
step of the slowest rank is the step. The median over iterations is what counts.

Memory: the peak growth of the process's resident set (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``) over a piece of work, measured once freed memory has been handed back to the OS; None
where /proc does not allow it.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import time
from typing import Any, Callable, Mapping

import torch.distributed as dist

from .pyplot import pyplot


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc keeps it otherwise), so the next peak measurement
    starts clean. A no-op where glibc's malloc_trim is not available."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_kib() -> int | None:
    """The resident set now (KiB), after releasing freed memory; None where /proc does not say."""
    release_freed_memory()
    return _status_kib("VmRSS")


def peak_growth_mib(run: Callable[[], Any], *, since_kib: int | None = None) -> float | None:
    """The peak resident memory during ``run()`` (MiB) above ``since_kib`` (a ``resident_kib()`` taken earlier,
    e.g. before a model was built, so that what it keeps counts too), by default above the resident set just
    before ``run``. None where /proc does not allow the measurement."""
    release_freed_memory()
    can_measure = _reset_peak_rss()
    base_kib = since_kib if since_kib is not None else _status_kib("VmRSS")
    run()
    peak_kib = _status_kib("VmHWM")
    if not can_measure or peak_kib is None or base_kib is None:
        return None
    return (peak_kib - base_kib) / 1024


def interleaved_seconds(steps: Mapping[str, Callable[[], Any]], *, warmup: int, iters: int,
                        on_iteration: Callable[[int], None] | None = None,
                        cpu_seconds: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of every timed step of every variant, interleaved (see the module docstring); call it on every rank
    of the world (it holds barriers).

    Args:
        steps: {variant: one step}, in the order they run within an iteration.
        warmup, iters: untimed and timed iterations.
        on_iteration: called with the number of iterations done (warm-up ones included) after each.
        cpu_seconds: when given, filled with {variant: [iters seconds of CPU this process used in the step]}: the
            work of this rank, whatever the waits (where ranks share cores, the wall time hides how the work is
            spread over the ranks).
    Returns:
        {variant: [iters seconds]}
    """
    for i in range(warmup):
        for step in steps.values():
            step()
        if on_iteration is not None:
            on_iteration(i + 1)
    seconds: dict[str, list[float]] = {v: [] for v in steps}
    for i in range(iters):
        for v, step in steps.items():
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            cpu_end = time.process_time()
            dist.barrier()  # the step of the slowest rank is the step
            seconds[v].append(time.perf_counter() - start)
            if cpu_seconds is not None:
                cpu_seconds.setdefault(v, []).append(cpu_end - cpu_start)
        if on_iteration is not None:
            on_iteration(warmup + i + 1)
    return seconds


def plot_throughput(rows: list[dict[str, Any]], path: str, title: str, *, group_of: Callable[[dict[str, Any]], str],
                    value: str = "tokens_per_s_per_rank", ylabel: str = "tokens/s per rank") -> None:
    """Grouped bars of ``row[value]``: one group per ``group_of(row)`` (in order of first appearance), one bar per
    variant (likewise), written as a PNG."""
    plt = pyplot("the comparison chart")
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups) * max(1, len(variants)) / 3), 4))
    for i, v in enumerate(variants):
        values = [next((r[value] for r in rows if group_of(r) == g and r["variant"] == v), 0.0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=v)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.05)
    # Below the axes, one row: inside them the legend would cover the bars.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(variants)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str, payload: Mapping[str, Any]) -> str:
    """``payload`` as indented JSON at ``path`` (its folder made); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    return path


def write_json_and_chart(directory: str, stem: str, payload: Mapping[str, Any], rows: list[dict[str, Any]],
                         title: str, *, group_of: Callable[[dict[str, Any]], str]) -> list[str]:
    """``<stem>.json`` (``payload``) and ``<stem>.png`` (``plot_throughput`` of ``rows``) in ``directory``; returns
    their paths."""
    json_path = write_json(os.path.join(directory, f"{stem}.json"), payload)
    png_path = os.path.join(directory, f"{stem}.png")
    plot_throughput(rows, png_path, title, group_of=group_of)
    return [json_path, png_path]
