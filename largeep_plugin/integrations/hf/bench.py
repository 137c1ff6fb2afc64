"""``largeep bench hf``: one Hugging Face MoE model trained side by side on a local world of CPU ranks, each
variant of ``bench_variants.py`` (unconverted, DeepSpeed's AutoEP, large-EP, large-EP with dynamic replicas or
planned replicas) in the same world, on the same tokens.

Shape legend:
    N  ranks (= EP size)   E  experts (= N)   T  tokens per rank

Beside the variants, each world's table has one figure that is not a run:
    force_balanced      ``large_ep``'s critical path with every rank's compute at the mean of the ranks
                        (the work of its steps spread perfectly), the figure vendors' force-balanced tables give.

Timing, two ways. Wall clock: the variants are interleaved in one world (``tools/side_by_side.py``), after
``warmup`` untimed steps; the median of ``iters`` timed steps counts; also the busiest rank's CPU time per step.
Critical path (``tools/critical_path.TurnTaking``): ``iters`` more steps of each variant with the ranks taking turns
between collectives, so no two ranks compute at once: the step's critical path is the sum over its compute
segments of the slowest rank's time plus the collectives' time (gloo over loopback here), what a cluster with one
device per rank would take; with ranks sharing cores, the wall clock hides the imbalance a GPU step would show.
Where the ranks have a core each (EP 2 on two cores), each is pinned to its own (``run_world(pin_cores=True)``) and
each turn-taking step is followed by one timed barrier to barrier with the ranks together and every collective
waited for where it is called (``TurnTaking(turns=False)``, taken apart the same way): the critical path must
agree with it, and the two decompositions say where they differ; and the world measures how much its cores slow
each other (``critical_path.core_sharing`` on an expert's GEMMs), the machine's share of any gap. Bytes: the
step's all-to-all bytes that would cross nodes with the ranks on two nodes. Memory: the peak growth of a rank's
resident set from before the variant's model is built through its first step (weights, gradients, optimizer state,
activations), the largest over the ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from typing import Any, Callable

import torch
import torch.nn as nn

from largeep_plugin.layer.moe_layer import load_stats
from largeep_plugin.placement.plan import Placement
from largeep_plugin.tools.critical_path import TurnTaking, core_sharing, median_step
from largeep_plugin.tools.launch import run_world
from largeep_plugin.tools.progress import ProgressBar
from largeep_plugin.tools.side_by_side import interleaved_seconds, peak_growth_mib, resident_kib

from .bench_variants import (VARIANTS, HFBenchSettings, build_variant, check_variants, deepspeed_config,
                             replica_placement, train_step)
from .tiny_models import ROUTERS, ModelSizes, rank_tokens


def _summed_load(model: nn.Module) -> torch.Tensor | None:
    """int64 [E] tokens per expert of the latest forward, summed over the model's large-EP layers (global counts);
    None for a model without any."""
    stats = load_stats(model)
    return sum(s.tokens_per_expert_E for s in stats.values()) if stats else None


def _first_steps(build: Callable[[], Any], ids_BS: torch.Tensor,
                 steps: int) -> tuple[Any, float | None, float, torch.Tensor | None]:
    """Build a variant and take its first ``steps`` steps: every variant takes the same steps, so they train alike.

    Returns the variant's engine, its peak memory growth (MiB) from before the build through the first step, the first
    step's loss, and (large-EP) the load summed over the steps and layers."""
    base = resident_kib()
    variant = build()
    losses: list[torch.Tensor] = []
    peak = peak_growth_mib(lambda: losses.append(train_step(variant, ids_BS)), since_kib=base)
    load_E = _summed_load(variant.module)
    for _ in range(steps - 1):
        train_step(variant, ids_BS)
        if load_E is not None:
            load_E = load_E + _summed_load(variant.module)
    return variant, peak, float(losses[0]), load_E


def _routing_facts(load_E: torch.Tensor, placement: Placement | None, model: nn.Module) -> dict[str, Any]:
    """What the recorded load says: the load, each layer's imbalance in the last step, the replicas' placement (when
    planned), and the planned max / mean load per rank of the one-expert-per-rank variants."""
    one_each = Placement.identity(load_E.numel()).figures(load_E).gpu_imbalance
    out = {"load": load_E.tolist(), "layer_imbalance": [s.imbalance for s in load_stats(model).values()],
           "replicas": None, "copies": None,
           "rank_imbalance": {"unconverted": 1.0, "autoep": one_each, "large_ep": one_each}}
    if placement is not None:
        out.update(replicas=[list(h) for h in placement.rank_to_experts], copies=placement.num_replicas)
        out["rank_imbalance"]["large_ep_replicas"] = placement.figures(load_E).gpu_imbalance
    return out


def bench_rank(rank: int, world: int, settings: HFBenchSettings, router: str, variants: list[str]) -> dict[str, Any]:
    """Build every variant (measuring its memory), record ``large_ep``'s load and plan the replicas from it, then
    time the variants interleaved. Returns this rank's seconds, memory, losses and the routing facts."""
    import deepspeed

    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if settings.device == "cuda":  # rank r on GPU r (a world on one machine), before NCCL starts
        torch.cuda.set_device(rank % torch.cuda.device_count())
    init_deepspeed_comm()
    ids_BS = rank_tokens(settings.sizes, rank, settings.seed, router, settings.zipf)
    extra = settings.replica_slots if settings.replica_slots is not None else world
    progress = ProgressBar(len(variants) + settings.warmup + settings.iters, label=f"  EP {world} {router:<7}") \
        if rank == 0 else None
    # One throwaway step of a minimal model first: the lazy one-time costs (DeepSpeed's and torch's first use)
    # would otherwise land in the first variant's memory.
    minimal = dataclasses.replace(settings.sizes, hidden_size=4 * settings.sizes.num_heads, ffn_hidden_size=4)
    train_step(build_variant("unconverted", dataclasses.replace(settings, sizes=minimal), router, world, None), ids_BS)
    built: dict[str, Any] = {}
    out: dict[str, Any] = {"peak_mib": {}, "first_loss": {}, "last_loss": {}, "cpu_seconds": {}}
    placement = None
    for i, v in enumerate(variants):
        built[v], out["peak_mib"][v], out["first_loss"][v], load_E = _first_steps(
            lambda: build_variant(v, settings, router, world, placement if v == "large_ep_replicas" else None), ids_BS,
            settings.record_steps)
        if v == "large_ep":
            placement = replica_placement(load_E, world, extra) if "large_ep_replicas" in variants else None
            out.update(_routing_facts(load_E, placement, built[v].module))
        if progress is not None:
            progress.update(i + 1, built=v)

    def step(v: str) -> None:
        out["last_loss"][v] = float(train_step(built[v], ids_BS))

    out["seconds"] = interleaved_seconds(
        {v: (lambda v=v: step(v)) for v in variants}, warmup=settings.warmup, iters=settings.iters,
        cpu_seconds=out["cpu_seconds"],
        on_iteration=None if progress is None else lambda i: progress.update(len(variants) + i, iteration=i))
    if settings.critical_path:
        # Where every rank has a core (EP 2 on two cores), each turn-taking step is followed by a wall-clock step
        # with the collectives waited for where they are called (as the turns wait for them): the pairs see the
        # same machine, and the critical path must agree with that wall clock (the mode's own check).
        waited = {} if world <= (os.cpu_count() or 1) else None
        out["critical"] = _critical_paths(built, variants, ids_BS, settings.iters, world, settings.device, waited)
        if waited is not None:
            out["seconds_waited"] = waited
            # How much this machine's cores slow each other: an expert's GEMMs alone and on every rank at once.
            out["core_sharing"] = core_sharing(_expert_gemms(settings.sizes, settings.device), rounds=5)
    out["rank_imbalance_measured"] = {v: _rank_imbalance(built[v].module) for v in variants}
    if progress is not None:
        progress.close()
    return out


def _critical_paths(built: dict[str, Any], variants: list[str], ids_BS: torch.Tensor, iters: int,
                    world: int, device: str = "cpu", waited: dict[str, list[float]] | None = None
                    ) -> dict[str, dict[str, float]]:
    """``iters`` steps of each variant with the ranks taking turns (``TurnTaking``): the medians of the critical
    path, its compute, the balanced compute, the communication, and the all-to-all bytes across two nodes. With
    ``waited`` (a dict), each such step is followed by one timed barrier to barrier with the ranks together and the
    collectives waited where called (``TurnTaking(turns=False)``), its seconds filled in per variant and its
    compute and communication, taken apart alike, beside the critical path's (``waited_compute_s``...)."""
    sync = None if device == "cpu" else torch.accelerator.synchronize
    clock = TurnTaking(synchronize=sync)
    together = TurnTaking(synchronize=sync, turns=False) if waited is not None else None
    out = {}
    for v in variants:
        steps, side = [], []
        for _ in range(iters):
            with clock:
                train_step(built[v], ids_BS)
            steps.append(clock.gathered())
            if together is not None:
                with together:
                    waited.setdefault(v, []).extend(interleaved_seconds({v: lambda v=v: train_step(built[v], ids_BS)},
                                                                        warmup=0, iters=1)[v])
                side.append(together.gathered())
        out[v] = {**median_step(steps), "internode_mb": statistics.median(
            s.internode_bytes(max(1, world // 2)) for s in steps) / 2**20}
        if side:
            figures = median_step(side)
            out[v].update({f"waited_{k}": figures[k] for k in ("compute_s", "communication_s")})
    return out


def _expert_gemms(sizes: ModelSizes, device: str) -> Callable[[], None]:
    """One expert's forward GEMMs on a balanced share of a rank's rows (B * S * top_k: E = EP), fixed weights."""
    gen = torch.Generator().manual_seed(0)
    x_RH, w_HF, w_FH = (torch.randn(*shape, generator=gen).to(device) for shape in (
        (sizes.tokens_per_rank * sizes.top_k, sizes.hidden_size), (sizes.hidden_size, sizes.ffn_hidden_size),
        (sizes.ffn_hidden_size, sizes.hidden_size)))

    def gemms() -> None:
        torch.relu(x_RH @ w_HF) @ w_FH
        if device != "cpu":
            torch.accelerator.synchronize()
    return gemms


def _rank_imbalance(model: nn.Module) -> float | None:
    """The worst layer's max / mean rows per rank of the latest forward (large-EP variants), else None."""
    stats = load_stats(model)
    values = [s.rank_imbalance for s in stats.values() if s.rank_imbalance is not None]
    return max(values) if values else None


def _warm_imports(family: str, variants: list[str], settings: HFBenchSettings | None = None,
                  routers: list[str] = (), ep_sizes: list[int] = ()) -> None:
    """Import in the parent what every rank would import itself (the ranks are forked), and train the learned
    routers there once (every rank inherits them)."""
    import importlib

    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if "autoep" in variants:
        importlib.import_module("deepspeed.module_inject.auto_ep")
    load_deepspeed_ops_before_fork()
    if settings is not None and "learned" in routers:
        from .tiny_models import learned_state

        for ep in ep_sizes:
            learned_state(settings.family, settings.experts(ep), settings.sizes, settings.seed, settings.learn_steps,
                          settings.zipf)


def run_hf_bench(settings: HFBenchSettings, ep_sizes: list[int], routers: list[str], variants: list[str], *,
                 timeout: float = 1800.0, on_world: Callable[[dict[str, Any]], None] | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run one world per (EP size, router), every variant in it. Returns (rows: one per (EP, router, variant), the
    median step's tokens/s per rank and the ratios to ``autoep`` and ``unconverted``; worlds: the routing facts of
    each world, which ``on_world`` sees as they come)."""
    check_variants(variants)
    variants = [v for v in VARIANTS if v in variants]   # large_ep records the load before the replicas are built
    for r in routers:
        if r not in ROUTERS:
            raise ValueError(f"router {r!r} is not one of {', '.join(ROUTERS)}")
    for ep in ep_sizes:
        if ep < 1 or settings.experts(ep) < settings.sizes.top_k or settings.experts(ep) < ep:
            raise ValueError(f"EP size {ep} with {settings.experts(ep)} experts: need 1 <= EP <= E and "
                             f"E >= top_k={settings.sizes.top_k}")
    _warm_imports(settings.family, variants, settings, routers, ep_sizes)
    rows: list[dict[str, Any]] = []
    worlds: list[dict[str, Any]] = []
    for ep in ep_sizes:
        for router in routers:
            per_rank = run_world(bench_rank, ep, args=(settings, router, variants), timeout=timeout,
                                 backend="gloo" if settings.device == "cpu" else "nccl", pin_cores=True)
            first = per_rank[0]
            world = {"ep": ep, "router": router, **{k: first.get(k) for k in ("load", "layer_imbalance", "replicas",
                                                                             "copies")}}
            load = first.get("load")
            world["imbalance"] = max(load) / (sum(load) / len(load)) if load else None
            world["core_sharing"] = first.get("core_sharing")
            worlds.append(world)
            group = []
            for v in variants:
                peaks = [r["peak_mib"][v] for r in per_rank]
                group.append({
                    "ep": ep, "router": router, "variant": v,
                    # Every rank timed the same barrier-to-barrier span; rank 0's list is the world's.
                    "tokens_per_s_per_rank": settings.sizes.tokens_per_rank / statistics.median(first["seconds"][v]),
                    "step_seconds": first["seconds"][v],
                    # The busiest rank's CPU time per step: the step if every rank had a core of its own.
                    "busiest_cpu_ms": 1e3 * statistics.median(max(per_iter) for per_iter in
                                                              zip(*(r["cpu_seconds"][v] for r in per_rank))),
                    "peak_mib": max(peaks) if all(p is not None for p in peaks) else None,
                    "imbalance": world["imbalance"],
                    "rank_imbalance": first.get("rank_imbalance", {}).get(v),
                    "measured_rank_imbalance": first["rank_imbalance_measured"].get(v),
                    "first_loss": statistics.fmean(r["first_loss"][v] for r in per_rank),
                    "last_loss": statistics.fmean(r["last_loss"][v] for r in per_rank),
                    **_critical_columns(first.get("critical", {}).get(v), settings),
                    "waited_tokens_per_s": (settings.sizes.tokens_per_rank / statistics.median(
                        first["seconds_waited"][v]) if "seconds_waited" in first else None),
                    "core_slowdown": (first.get("core_sharing") or {}).get("slowdown"),
                })
            if "large_ep" in first.get("critical", {}):
                group.append(_force_balanced_row(first["critical"]["large_ep"], settings, ep, router, world))
            for key in ("tokens_per_s_per_rank", "critical_tokens_per_s"):
                by = {r["variant"]: r[key] for r in group if r.get(key)}
                suffix = "" if key == "tokens_per_s_per_rank" else "_critical"
                for r in group:
                    for base in ("autoep", "unconverted"):
                        r[f"vs_{base}{suffix}"] = r[key] / by[base] if base in by and r.get(key) else None
            rows.extend(group)
            if on_world is not None:
                on_world(world)
    return rows, worlds


def _critical_columns(critical: dict[str, float] | None, settings: HFBenchSettings) -> dict[str, Any]:
    """A variant's critical-path figures as table columns (None without the critical-path timing)."""
    if critical is None:
        return {"critical_tokens_per_s": None, "critical_ms": None, "comm_ms": None, "internode_mb": None}
    return {"critical_tokens_per_s": settings.sizes.tokens_per_rank / critical["critical_path_s"],
            "critical_ms": 1e3 * critical["critical_path_s"], "compute_ms": 1e3 * critical["compute_s"],
            # Every rank at the mean of the ranks in every segment: for a variant whose ranks do the same work
            # (unconverted), compute_ms over it is what the slowest of N ranks costs when nothing is imbalanced.
            "balanced_compute_ms": 1e3 * critical["balanced_compute_s"],
            "comm_ms": 1e3 * critical["communication_s"], "internode_mb": critical["internode_mb"],
            "per_step_critical_tokens_per_s": settings.sizes.tokens_per_rank / critical["per_step_critical_path_s"],
            # The check's other side (EP <= cores): the waited wall-clock steps taken apart the same way.
            **{f"waited_{k}_ms": 1e3 * critical[f"waited_{k}_s"] for k in ("compute", "communication")
               if f"waited_{k}_s" in critical}}


def _force_balanced_row(critical: dict[str, float], settings: HFBenchSettings, ep: int, router: str,
                        world: dict[str, Any]) -> dict[str, Any]:
    """``large_ep``'s step with every rank's compute at the mean of the ranks (``StepTimes.balanced_compute``)."""
    seconds = critical["balanced_compute_s"] + critical["communication_s"]
    return {"ep": ep, "router": router, "variant": "force_balanced", "tokens_per_s_per_rank": None,
            "step_seconds": None, "busiest_cpu_ms": None, "peak_mib": None, "imbalance": world["imbalance"],
            "rank_imbalance": 1.0, "measured_rank_imbalance": 1.0, "first_loss": None, "last_loss": None,
            "critical_tokens_per_s": settings.sizes.tokens_per_rank / seconds, "critical_ms": 1e3 * seconds,
            "compute_ms": 1e3 * critical["balanced_compute_s"], "comm_ms": 1e3 * critical["communication_s"],
            "internode_mb": critical["internode_mb"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table (with a column for the wall clock with collectives waited at once, where a run
    measured it)."""
    waited = any(r.get("waited_tokens_per_s") for r in rows)
    def num(value: float | None, fmt: str, unit: str = "") -> str:
        return "-" if value is None else format(value, fmt) + unit

    lines = [f"{'EP':>3}  {'router':<8}{'variant':<18}{'wall tok/s':>11}{'vs autoep':>10}{'crit tok/s':>11}"
             f"{'vs autoep':>10}{'crit ms':>9}{'comm ms':>9}{'x-node MB':>10}{'peak MiB':>9}{'imbal':>7}"
             f"{'rank load':>10}" + (f"{'waited tok/s':>13}" if waited else "")]
    for r in rows:
        lines.append(f"{r['ep']:>3}  {r['router']:<8}{r['variant']:<18}{num(r['tokens_per_s_per_rank'], ',.0f'):>11}"
                     f"{num(r.get('vs_autoep'), '.2f', 'x'):>10}{num(r.get('critical_tokens_per_s'), ',.0f'):>11}"
                     f"{num(r.get('vs_autoep_critical'), '.2f', 'x'):>10}{num(r.get('critical_ms'), '.1f'):>9}"
                     f"{num(r.get('comm_ms'), '.1f'):>9}{num(r.get('internode_mb'), '.2f'):>10}"
                     f"{num(r['peak_mib'], '.1f'):>9}{num(r['imbalance'], '.2f'):>7}"
                     f"{num(r.get('measured_rank_imbalance') or r['rank_imbalance'], '.2f'):>10}"
                     + (f"{num(r.get('waited_tokens_per_s'), ',.0f'):>13}" if waited else ""))
    return "\n".join(lines)


def result_json(settings: HFBenchSettings, rows: list[dict[str, Any]], worlds: list[dict[str, Any]],
                autoep_skipped: str | None) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(settings), "deepspeed_config": deepspeed_config(settings),
            "autoep_skipped": autoep_skipped, "worlds": worlds, "rows": rows}
