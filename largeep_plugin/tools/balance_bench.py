"""``largeep bench balance``: one MoE layer under a skewed router, one expert per rank against dynamic replicas.

Shape legend:  T tokens per rank   H hidden   F expert FFN   E experts (= ranks)   K top_k   L slots per rank

In one world of E gloo ranks, two layers with the same seeded weights train side by side on the same tokens
(fresh ones every step), forward + backward + SGD: ``static`` (one expert per rank, ``dynamic_replicas=0``) and
``dynamic`` (``dynamic_replicas=S``, ``largeep_plugin.rebalance`` after every step, re-planned every step). The
router is skewed the way ``bench layer --skew`` skews it (expert e's logit moves by ``-skew * ln(e + 1)``), so
the load is Zipf-like, expert 0 hottest.

Per step and variant:
    rank imbalance          max / mean rows the ranks computed (``LoadStats.rank_imbalance``);
    busiest expert time     each rank's expert phase (forward + backward of its slots on the rows each slot
                            received that step, split as the layer split them) timed with the ranks taking turns
                            (``critical_path.exclusive_seconds``: nothing else runs meanwhile), then the slowest
                            rank's: what the step would wait for on a cluster with one GPU per rank;
    ideal                   the same for perfectly balanced rows (T*K on every rank, one expert): the
                            force-balanced figure vendors publish.
The rows per slot are recomputed from the layer's own routing (the router's output and the plan's
``destinations``, summed over the ranks): exactly what the layer dispatched. Both variants' outputs are compared
every step (the same math: the difference is printed, to show the comparison is fair).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.experts import LinearWeights, MLPWeights, SlotExperts
from largeep_plugin.layer.moe_layer import LargeEPMoE, rebalance
from .critical_path import exclusive_seconds
from .launch import run_world
from .layer_bench import skewed_router_weight


@dataclass(frozen=True, kw_only=True)
class BalanceBenchSettings:
    """One benchmark point (sizes as ``bench layer``; ``spare_slots`` S of the dynamic variant)."""

    hidden_size: int = 256
    ffn_hidden_size: int = 512
    tokens_per_rank: int = 2048
    top_k: int = 2
    skew: float = 0.15
    steps: int = 6
    spare_slots: int = 1
    repeats: int = 2
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "tokens_per_rank", "top_k", "steps", "spare_slots",
                     "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if not (math.isfinite(self.skew) and self.skew >= 0):
            raise ValueError(f"skew={self.skew!r} must be a finite number >= 0")

    def layer_config(self, num_experts: int, spare_slots: int) -> LargeEPConfig:
        return LargeEPConfig(hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
                             num_experts=num_experts, top_k=self.top_k, init_seed=self.seed,
                             dynamic_replicas=spare_slots, rebalance_decay=0.5, bias_update_rate=0.0)


def _tokens(settings: BalanceBenchSettings, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((settings.seed * 1_000_003 + rank) * 7919 + step)
    x_TH = torch.randn(settings.tokens_per_rank, settings.hidden_size, generator=gen)
    x_TH[:, 0] += 1.0  # feature 0 carries the router's skew
    return x_TH


def _rows_per_slot(layer: LargeEPMoE, topk_ids_TK: torch.Tensor, keep_TK: torch.Tensor) -> list[int]:
    """Rows each slot of this rank received in the forward that routed ``topk_ids_TK``: every rank's assignments
    to (rank, slot), summed over the ranks (one all_reduce of R x L counts)."""
    r = layer.ep_size
    if layer.clones is not None:
        dest_TK, slot_TK = layer.clones.destinations(topk_ids_TK)
        slots = layer.clones.num_slots
    else:
        dest_TK, slot_TK, slots = topk_ids_TK, torch.zeros_like(topk_ids_TK), 1
    key = torch.where(keep_TK, dest_TK * slots + slot_TK, r * slots).reshape(-1)
    counts = torch.zeros(r * slots + 1, dtype=torch.int64).scatter_add_(0, key, torch.ones_like(key))[:-1]
    dist.all_reduce(counts)
    return counts.view(r, slots)[layer.ep_rank].tolist()


def _slot_weights(layer: LargeEPMoE) -> list[MLPWeights | None]:
    """Detached copies of the weights of this rank's slots (homes, then clones; None for an empty slot), so that
    timing them touches neither the layer's gradients nor its collectives."""
    if layer.clones is None:
        live: list[Any] = [layer.expert]
    else:
        with torch.no_grad():
            _, slot_experts = layer.clones.bind((torch.empty(0),), [m for _, m in layer.local_experts()],
                                                layer.config.expert_config)
        live = slot_experts.weights
    out: list[MLPWeights | None] = []
    for w in live:
        if w is None:
            out.append(None)
            continue
        out.append(MLPWeights(*(LinearWeights(*(t.detach().clone().requires_grad_(True) if t is not None else None
                                                for t in (lin.weight, lin.bias))) for lin in (w.fc1, w.fc2))))
    return out


def _expert_phase(weights: list[MLPWeights | None], rows_L: list[int], layer: LargeEPMoE) -> Any:
    """Forward + backward of the slots ``weights`` on ``rows_L`` rows each, as a callable to time."""
    experts = SlotExperts(weights, layer.config.expert_config)
    rows = torch.randn(sum(rows_L), layer.config.hidden_size, requires_grad=True)
    grad = torch.randn(sum(rows_L), layer.config.hidden_size)

    def run() -> None:
        experts(rows, [rows_L]).backward(grad)

    return run


def balance_rank(rank: int, world_size: int, settings: BalanceBenchSettings) -> dict[str, Any]:
    """One rank of the benchmark (module docstring); returns the per-step records (the same on every rank)."""
    weight_EH = skewed_router_weight(settings.layer_config(world_size, 0), settings.skew)
    layers = {}
    for name, spare in (("static", 0), ("dynamic", settings.spare_slots)):
        layer = LargeEPMoE(settings.layer_config(world_size, spare if name == "dynamic" else 0))
        with torch.no_grad():
            layer.router.weight.copy_(weight_EH)
        layers[name] = (layer, torch.optim.SGD(layer.parameters(), lr=settings.lr))
    steps: list[dict[str, Any]] = []
    for step in range(settings.steps):
        x_TH = _tokens(settings, rank, step)
        record: dict[str, Any] = {"step": step}
        outputs = {}
        for name, (layer, opt) in layers.items():
            routed: list[Any] = []
            handle = layer.router.register_forward_hook(lambda _m, _a, out: routed.append(out))
            y = layer(x_TH)
            handle.remove()
            y.square().mean().backward()
            rows_L = _rows_per_slot(layer, routed[0].topk_ids_TK, routed[0].keep_TK)
            times = exclusive_seconds(_expert_phase(_slot_weights(layer), rows_L, layer), repeats=settings.repeats)
            stats = layer.last_stats
            rows_R = [int(n) for n in stats.rows_per_rank_R.tolist()]
            record[name] = {"rank_imbalance": stats.rank_imbalance, "expert_imbalance": stats.imbalance,
                            "rows": rows_R, "timed_rows": sum(rows_L),
                            "busiest_expert_s": max(times), "mean_expert_s": sum(times) / len(times),
                            "clones": layer.clones.plan.num_clones if layer.clones is not None else 0}
            outputs[name] = y.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            rebalance(layer)
        diff = (outputs["static"] - outputs["dynamic"]).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        record["output_difference"] = float(diff)
        steps.append(record)
    static = layers["static"][0]
    ideal = exclusive_seconds(_expert_phase(_slot_weights(static), [settings.tokens_per_rank * settings.top_k], static),
                              repeats=settings.repeats)
    return {"steps": steps, "ideal_expert_s": max(ideal)}


def run_balance_bench(settings: BalanceBenchSettings, eps: list[int], timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Every EP size in a world of its own; returns one result per EP: ``{"ep", "steps", "ideal_expert_s"}``."""
    out = []
    for ep in eps:
        result = run_world(balance_rank, ep, args=(settings,), timeout=timeout)[0]
        out.append({"ep": ep, **result})
    return out


def summary(result: dict[str, Any], skip: int = 2) -> dict[str, float]:
    """Means over the steps after the first ``skip`` (the plan needs a step of load before it exists)."""
    rows = result["steps"][skip:] or result["steps"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    static_s = mean([r["static"]["busiest_expert_s"] for r in rows])
    dynamic_s = mean([r["dynamic"]["busiest_expert_s"] for r in rows])
    return {
        "expert_imbalance": mean([r["static"]["expert_imbalance"] for r in rows]),
        "static_rank_imbalance": mean([r["static"]["rank_imbalance"] for r in rows]),
        "dynamic_rank_imbalance": mean([r["dynamic"]["rank_imbalance"] for r in rows]),
        "static_busiest_s": static_s, "dynamic_busiest_s": dynamic_s, "ideal_s": result["ideal_expert_s"],
        "speedup": static_s / dynamic_s, "dynamic_over_ideal": dynamic_s / result["ideal_expert_s"],
    }


# Targets of the dynamic-replicas design (docs/balancing.md): at EP 16, S = 1, expert imbalance >= 2.5.
TARGET_RANK_IMBALANCE = 1.10
TARGET_SPEEDUP = 1.4


def format_report(settings: BalanceBenchSettings, results: list[dict[str, Any]]) -> str:
    lines = [f"bench balance: T={settings.tokens_per_rank} tokens/rank, H={settings.hidden_size}, "
             f"F={settings.ffn_hidden_size}, top-{settings.top_k}, skew {settings.skew}, S={settings.spare_slots} "
             "(busiest rank's expert fwd+bwd, ranks timed in turn)"]
    for res in results:
        lines.append(f"EP {res['ep']}")
        lines.append("  step  expert imb  rank imb static  dynamic (clones)  busiest ms static  dynamic  ratio")
        for r in res["steps"]:
            s, d = r["static"], r["dynamic"]
            lines.append(f"  {r['step']:>4}  {s['expert_imbalance']:>10.2f}  {s['rank_imbalance']:>15.2f}  "
                         f"{d['rank_imbalance']:>7.2f} ({d['clones']:>2})  {1e3 * s['busiest_expert_s']:>17.2f}  "
                         f"{1e3 * d['busiest_expert_s']:>7.2f}  {s['busiest_expert_s'] / d['busiest_expert_s']:>5.2f}")
        sm = summary(res)
        lines.append(f"  steps 2+: rank imbalance {sm['static_rank_imbalance']:.2f} -> {sm['dynamic_rank_imbalance']:.2f}"
                     f", busiest expert {1e3 * sm['static_busiest_s']:.2f} -> {1e3 * sm['dynamic_busiest_s']:.2f} ms "
                     f"({sm['speedup']:.2f}x), force-balanced ideal {1e3 * sm['ideal_s']:.2f} ms (dynamic takes "
                     f"{sm['dynamic_over_ideal']:.2f}x of it); outputs equal to "
                     f"{max(r['output_difference'] for r in res['steps']):.1e}")
        if res["ep"] == 16 and settings.spare_slots == 1 and sm["expert_imbalance"] >= 2.5:
            met = (sm["dynamic_rank_imbalance"] <= TARGET_RANK_IMBALANCE, sm["speedup"] >= TARGET_SPEEDUP)
            lines.append(f"  target rank imbalance <= {TARGET_RANK_IMBALANCE}: {'met' if met[0] else 'NOT met'}; "
                         f"target busiest-rank speedup >= {TARGET_SPEEDUP}x: {'met' if met[1] else 'NOT met'}")
    return "\n".join(lines)


def result_json(settings: BalanceBenchSettings, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(settings),
            "results": [{**res, "summary": summary(res)} for res in results]}


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Rank imbalance per step, static and dynamic, one line each per EP size (PNG)."""
    from .pyplot import pyplot

    plt = pyplot("the balance chart")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        steps = [r["step"] for r in res["steps"]]
        for name, style in (("static", "--"), ("dynamic", "-")):
            axes[0].plot(steps, [r[name]["rank_imbalance"] for r in res["steps"]], style, label=f"EP {res['ep']} {name}")
            axes[1].plot(steps, [1e3 * r[name]["busiest_expert_s"] for r in res["steps"]], style,
                         label=f"EP {res['ep']} {name}")
    axes[0].set(xlabel="step", ylabel="rank imbalance (max / mean rows)", title="rows per rank")
    axes[1].set(xlabel="step", ylabel="busiest rank's expert ms", title="expert phase, ranks timed in turn")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
