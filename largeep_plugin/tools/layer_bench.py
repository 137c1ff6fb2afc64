"""Side-by-side benchmark of one MoE layer, forward + backward, on a local world of CPU ranks.

Shape legend:
    T  tokens per rank      H  hidden size      F  expert ffn hidden size      E  experts (= ranks)      K  top_k

Variants, all with E = world size (one expert per rank), the same weights and the same tokens:
    stock_dropless   DeepSpeed's ``deepspeed.moe.layer.MoE``, ``drop_tokens=False``
    stock_cf1        the same with ``capacity_factor=1.0`` (tokens over capacity are dropped)
    large_ep         the plugin's ``LargeEPMoE``
    ideal            the expert MLP alone on T*K rows per rank: perfectly balanced routing, no router, no
                     communication, run by all ranks at once (so it shares the cores exactly as the others do)

The stock variants come from a builder the caller passes in (``largeep_plugin/integrations/deepspeed/stock.py``), so
this file never imports DeepSpeed. Each EP size runs in a fresh world holding every variant; their iterations
are interleaved so that outside load (other processes on the machine) falls on all of them alike, and the median
iteration counts (``tools/side_by_side.py``: the timing, memory and chart pieces every side-by-side benchmark shares).

Memory: the peak growth of the process's resident set over one forward+backward, i.e. activations, communication
buffers and gradients, measured variant after variant; None where /proc does not allow it.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.experts import ExpertMLP
from .launch import run_world
from largeep_plugin.layer.moe_layer import LargeEPMoE
from .side_by_side import interleaved_seconds, peak_growth_mib
from largeep_plugin.layer.router import Router, route
from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import Topology

VARIANTS = ("stock_dropless", "stock_cf1", "large_ep", "ideal")
# Colocated experts, asked for by name (not in the demo): 8 experts per rank, each as wide as large_ep's one, so a
# rank computes the same rows with the same FLOPs, split 8 ways; as a loop over the slots, or as grouped GEMMs.
COLOCATED_VARIANTS = {"colocated8": False, "colocated8_gemm": True}
ALL_VARIANTS = VARIANTS + tuple(COLOCATED_VARIANTS)
PER_RANK = 8
STOCK_CAPACITY = {"stock_dropless": None, "stock_cf1": 1.0}

StockBuilder = Callable[[LargeEPConfig, int, "float | None", torch.Tensor], nn.Module]
"""``build(cfg, ep_size, capacity_factor, router_weight_EH) -> module`` mapping ``x_TH -> y_TH`` with the stock
layer (expert = this rank's seeded expert of ``cfg``, gate weight = ``router_weight_EH``)."""


@dataclass(frozen=True, kw_only=True)
class LayerBenchSettings:
    """One benchmark point.

    Args:
        hidden_size, ffn_hidden_size: H and F.
        tokens_per_rank: T.
        top_k: K (1 or 2: the stock gate's choices).
        skew: routing skew; 0 gives the near-uniform routing of a freshly initialised router, s > 0 adds
            ``-s * ln(e + 1)`` to expert e's logit (Zipf-like load, expert 0 hottest), the same for every variant.
        warmup, iters: untimed and timed forward+backward iterations.
        seed: seed of the weights and the tokens.
    """

    hidden_size: int = 256
    ffn_hidden_size: int = 512
    tokens_per_rank: int = 2048
    top_k: int = 2
    skew: float = 0.0
    warmup: int = 2
    iters: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "tokens_per_rank", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r} must be >= 0")
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k={self.top_k!r} must be 1 or 2 (the stock gate's choices)")
        if not (math.isfinite(self.skew) and self.skew >= 0):
            raise ValueError(f"skew={self.skew!r} must be a finite number >= 0")

    def layer_config(self, num_experts: int) -> LargeEPConfig:
        return LargeEPConfig(hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
                             num_experts=num_experts, top_k=self.top_k, init_seed=self.seed)


def router_weight(settings: LayerBenchSettings, num_experts: int) -> torch.Tensor:
    """The router weight ``[E, H]`` every variant uses (``skewed_router_weight``)."""
    return skewed_router_weight(settings.layer_config(num_experts), settings.skew)


def skewed_router_weight(cfg: LargeEPConfig, skew: float) -> torch.Tensor:
    """The seeded router weight ``[E, H]`` of ``cfg`` with column 0 carrying ``skew``: with the tokens' feature 0
    shifted by +1, expert e's logit moves by about ``-skew * ln(e + 1)`` (Zipf-like load, expert 0 hottest)."""
    weight_EH = Router(cfg.router_config, cfg.hidden_size, init_std=cfg.init_std, init_seed=cfg.init_seed).weight.detach().clone()
    weight_EH[:, 0] = -skew * torch.log1p(torch.arange(cfg.num_experts, dtype=torch.float32))
    return weight_EH


def rank_tokens(settings: LayerBenchSettings, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens ``x_TH`` and output gradient ``dy_TH`` (seeded by rank: the same for every variant)."""
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + rank)
    x_TH = torch.randn(settings.tokens_per_rank, settings.hidden_size, generator=gen)
    x_TH[:, 0] += 1.0
    return x_TH, torch.randn(x_TH.shape, generator=gen)


def _build(variant: str, settings: LayerBenchSettings, rank: int, world: int, weight_EH: torch.Tensor,
           build_stock: StockBuilder | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The variant's module and its input and output gradient on this rank."""
    cfg = settings.layer_config(world)
    x_TH, dy_TH = rank_tokens(settings, rank)
    if variant == "large_ep":
        layer: nn.Module = LargeEPMoE(cfg)
        with torch.no_grad():
            layer.router.weight.copy_(weight_EH)
    elif variant in STOCK_CAPACITY:
        if build_stock is None:
            raise ValueError(f"variant {variant!r} needs a stock builder (DeepSpeed)")
        layer = build_stock(cfg, world, STOCK_CAPACITY[variant], weight_EH)
    elif variant in COLOCATED_VARIANTS:
        layer = _colocated_layer(settings, world, grouped_gemm=COLOCATED_VARIANTS[variant])
    elif variant == "ideal":
        layer = ExpertMLP(cfg.expert_config, expert_id=rank, init_seed=cfg.init_seed)
        # Perfect balance: each rank's expert gets exactly T*K rows (E*T*K assignments over E experts).
        x_TH, dy_TH = x_TH.repeat(settings.top_k, 1), dy_TH.repeat(settings.top_k, 1)
    else:
        raise ValueError(f"variant={variant!r} is not one of {list(ALL_VARIANTS)}")
    return layer, x_TH.requires_grad_(True), dy_TH


def _colocated_layer(settings: LayerBenchSettings, world: int, *, grouped_gemm: bool) -> nn.Module:
    """8 experts per rank (E = 8 W), expert e on rank e // 8, the router skewed alike."""
    e = PER_RANK * world
    cfg = dataclasses.replace(settings.layer_config(e), grouped_gemm=grouped_gemm)
    placement = Placement(topology=Topology.uniform(1, world), num_experts=e,
                          rank_to_experts=tuple(tuple(range(PER_RANK * r, PER_RANK * (r + 1))) for r in range(world)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the colocation warning: colocation is the point here
        layer = LargeEPMoE(cfg, placement=placement)
    with torch.no_grad():
        layer.router.weight.copy_(router_weight(settings, e))
    return layer


def _step(layer: nn.Module, x_TH: torch.Tensor, dy_TH: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x_TH.grad = None
    layer(x_TH).backward(dy_TH)


def bench_rank(rank: int, world: int, settings: LayerBenchSettings, variants: list[str],
               build_stock: StockBuilder | None) -> dict[str, Any]:
    """Time every variant on this rank, interleaved: iteration i of every variant runs before iteration i + 1 of
    any, so that load from outside the benchmark falls on all variants alike. Then measure each variant's peak
    memory growth over one more iteration.

    Returns:
        {"seconds": {variant: [per-iteration seconds]}, "peak_growth_mib": {variant: MiB or None}, routing facts}
    """
    torch.manual_seed(settings.seed)
    weight_EH = router_weight(settings, world)
    built = {v: _build(v, settings, rank, world, weight_EH, build_stock) for v in variants}
    seconds = interleaved_seconds({v: (lambda v=v: _step(*built[v])) for v in variants}, warmup=settings.warmup,
                                  iters=settings.iters)
    growth = {v: peak_growth_mib(lambda v=v: _step(*built[v])) for v in variants}
    routing = _routing_facts(settings, weight_EH, rank_tokens(settings, rank)[0], settings.layer_config(world))
    return {"seconds": seconds, "peak_growth_mib": growth, **routing}


def _routing_facts(settings: LayerBenchSettings, weight_EH: torch.Tensor, x_TH: torch.Tensor,
                   cfg: LargeEPConfig) -> dict[str, float]:
    """Global imbalance (max/mean tokens per expert) and the stock layer's dropless padding: its buffers hold
    E * C rows per rank with C the largest per-rank expert count anywhere, against T*K rows really routed."""
    with torch.no_grad():
        counts_E = route(x_TH, weight_EH, torch.zeros(cfg.num_experts), cfg.router_config).tokens_per_expert_E
    global_E = counts_E.clone()
    dist.all_reduce(global_E)
    largest = counts_E.max().clone()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    routed = settings.tokens_per_rank * settings.top_k
    return {
        "imbalance": float(global_E.max()) / float(global_E.float().mean()),
        "stock_padding": float(largest) * cfg.num_experts / routed,
    }


def run_layer_bench(settings: LayerBenchSettings, ep_sizes: list[int], variants: list[str],
                    build_stock: StockBuilder | None, *, timeout: float = 600.0,
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every EP size in its own world (all variants side by side in it); one row per (EP size, variant), its
    time the median over iterations (``on_row`` sees rows as they come)."""
    for v in variants:
        if v not in ALL_VARIANTS:
            raise ValueError(f"variant {v!r} is not one of {list(ALL_VARIANTS)}")
    rows = []
    for ep in ep_sizes:
        if ep < 2:
            raise ValueError(f"EP size {ep} must be >= 2")
        per_rank = run_world(bench_rank, ep, args=(settings, variants, build_stock), timeout=timeout)
        for variant in variants:
            # Every rank timed the same barrier-to-barrier span; rank 0's list is the world's.
            seconds = statistics.median(per_rank[0]["seconds"][variant])
            growth = [r["peak_growth_mib"][variant] for r in per_rank]
            row = {
                "ep": ep,
                "variant": variant,
                "tokens_per_s_per_rank": settings.tokens_per_rank / seconds,
                "step_seconds": per_rank[0]["seconds"][variant],
                "peak_growth_mib": max(growth) if all(g is not None for g in growth) else None,
                "imbalance": per_rank[0]["imbalance"],
                "stock_padding": per_rank[0]["stock_padding"],
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per EP size: large-EP throughput over each other variant's (> 1 means large-EP is faster)."""
    out = []
    for ep in sorted({r["ep"] for r in rows}):
        by = {r["variant"]: r["tokens_per_s_per_rank"] for r in rows if r["ep"] == ep}
        if "large_ep" not in by:
            continue
        entry: dict[str, Any] = {"ep": ep}
        for other in ("stock_dropless", "stock_cf1", "ideal"):
            if other in by:
                entry[f"large_ep_over_{other}"] = by["large_ep"] / by[other]
        out.append(entry)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table, with each row's throughput relative to large-EP at the same EP size."""
    lead = {r["ep"]: r["tokens_per_s_per_rank"] for r in rows if r["variant"] == "large_ep"}
    lines = [f"{'EP':>3}  {'variant':<15}{'tokens/s/rank':>14}{'vs large-EP':>12}{'peak MiB':>10}"
             f"{'imbalance':>11}{'stock pad':>10}"]
    for r in rows:
        rel = f"{r['tokens_per_s_per_rank'] / lead[r['ep']]:.2f}x" if r["ep"] in lead else "-"
        mem = f"{r['peak_growth_mib']:.1f}" if r["peak_growth_mib"] is not None else "n/a"
        lines.append(f"{r['ep']:>3}  {r['variant']:<15}{r['tokens_per_s_per_rank']:>14,.0f}{rel:>12}{mem:>10}"
                     f"{r['imbalance']:>11.2f}{r['stock_padding']:>10.2f}")
    return "\n".join(lines)


def result_json(settings: LayerBenchSettings, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"settings": asdict(settings), "rows": rows, "ratios": ratios(rows)}
