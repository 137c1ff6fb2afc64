"""What ``largeep bench hf`` compares: its settings, and one Hugging Face MoE model built as each variant.

Shape legend:
    N  ranks (= EP size)   E  experts (= N unless ``num_experts``)   X  extra expert slots of the replicas variant

Every variant is the same tiny random-init model (``tiny_models.py``: same weights, same tokens per rank) under the
same DeepSpeed config (``deepspeed_config``: ZeRO stage 1, AdamW); one step (``train_step``) is forward + backward +
optimizer step:
    unconverted         the model under plain ``deepspeed.initialize``: every rank holds every expert (data parallel)
    autoep              DeepSpeed's own AutoEP (``"expert_parallel": {"autoep_size": N}``): expert e on rank e
    large_ep            the model converted by the plugin: ``largeep_plugin.deepspeed.initialize`` with the
                        ``"large_ep"`` section (bias rate 0, as the others have no balancing bias): expert e on rank e
    large_ep_dynamic    the same with dynamic replicas (``"dynamic_replicas": 1``): one spare slot per rank, clones
                        of the hot experts re-planned after every step from the load (docs/balancing.md)
    large_ep_replicas   the same with E + X expert slots (X = N by default: a second slot on every rank); the extra
                        copies go to the hot experts, planned by ``replica_placement`` from the per-expert load
                        that ``large_ep`` recorded (its layers' ``last_stats``) over its first steps. Its extra
                        memory shows in the peak-memory column.

A rank with two slots runs them one after the other (colocated experts); the placement goes to ``initialize``,
which sums the replicas' gradients over their replica group in the engine's step, before the engine reduces them.
That needs ``"managed_gradient_accumulation": false`` (the engine reduces gradients in ``step()``, not at the end of
``backward()``): every variant runs with it, the same config for all. A small learning rate keeps the routing as
built for the whole run.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.placement.topology import Topology

from .tiny_models import LEARN_ZIPF, ModelSizes, bench_model, check_family, moe_routers

VARIANTS = ("unconverted", "autoep", "large_ep", "large_ep_dynamic", "large_ep_replicas")
AUTOEP_NEWEST_TRANSFORMERS = "5.22.2"


@dataclass(frozen=True, kw_only=True)
class HFBenchSettings:
    """One benchmark run.

    Fields:
        family: the model's ``model_type`` (``tiny_models.BENCH_FAMILIES``).
        sizes: the model's sizes and the tokens per rank.
        skew: how far the skewed router lifts the hot experts' logits (standard deviations).
        replica_slots: X, the extra expert slots of ``large_ep_replicas`` (None: one per rank, X = N).
        record_steps: the first steps of every variant, before the timed ones; the replicas are planned from the
            load ``large_ep`` recorded over its own.
        warmup, iters: untimed and timed interleaved steps per variant.
        seed: seed of the weights and the tokens.
        lr: AdamW's learning rate (small: the routing stays as built).
        learn_steps: the training steps of the ``"learned"`` router (``tiny_models.learned_state``).
        zipf: the exponent of the token frequencies of the Markov chain the ``"learned"`` router learns on and is
            timed on (``MarkovChainData``; 1: about text's, 0: every token about as frequent).
        critical_path: also time every variant with the ranks taking turns (module docstring).
        num_experts: E, None: the EP size (one expert per rank); more than the EP size colocates them (``EP 1``: every
            expert on the one rank, ``largeep gpu-check``'s side by side).
        device: ``"cpu"`` (gloo) or ``"cuda"`` (rank r on GPU r, NCCL).
    """

    family: str
    sizes: ModelSizes = field(default_factory=ModelSizes)
    skew: float = 1.5
    replica_slots: int | None = None
    record_steps: int = 2
    warmup: int = 2
    iters: int = 5
    seed: int = 0
    lr: float = 1e-5
    learn_steps: int = 300
    zipf: float = LEARN_ZIPF
    critical_path: bool = True
    num_experts: int | None = None
    device: str = "cpu"

    def experts(self, ep_size: int) -> int:
        """E of a world of ``ep_size`` ranks."""
        return ep_size if self.num_experts is None else self.num_experts

    def __post_init__(self) -> None:
        check_family(self.family)
        for name, low in (("record_steps", 1), ("warmup", 0), ("iters", 1), ("seed", 0), ("learn_steps", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if self.replica_slots is not None and (not isinstance(self.replica_slots, int) or self.replica_slots < 1):
            raise ValueError(f"replica_slots={self.replica_slots!r} must be an integer >= 1 (or None: one per rank)")
        if not (math.isfinite(self.skew) and self.skew >= 0):
            raise ValueError(f"skew={self.skew!r} must be a finite number >= 0")
        if not (math.isfinite(self.zipf) and self.zipf >= 0):
            raise ValueError(f"zipf={self.zipf!r} must be a finite number >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a finite number > 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or 'cuda'")
        if self.num_experts is not None and (not isinstance(self.num_experts, int) or self.num_experts < 1):
            raise ValueError(f"num_experts={self.num_experts!r} must be an integer >= 1 (or None: the EP size)")


def check_variants(variants: list[str]) -> None:
    """ValueError for an unknown variant, or replicas without the ``large_ep`` run they are planned from."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants {unknown or variants}: choose from {', '.join(VARIANTS)}")
    if "large_ep_replicas" in variants and "large_ep" not in variants:
        raise ValueError("large_ep_replicas is planned from the load large_ep records: list large_ep too")


def autoep_preset(family: str) -> str | None:
    """DeepSpeed's AutoEP preset for ``family`` (a Hugging Face model_type), None when it has none."""
    from deepspeed.module_inject.auto_ep_presets.registry import preset_name_for_hf_model_type

    return preset_name_for_hf_model_type(family)


def autoep_unavailable(family: str) -> str | None:
    """Why DeepSpeed's AutoEP cannot run ``family`` here (one line), or None when it can."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) > Version(AUTOEP_NEWEST_TRANSFORMERS):
        return (f"transformers {transformers.__version__}: DeepSpeed's AutoEP works up to {AUTOEP_NEWEST_TRANSFORMERS} "
                "(from 5.23 deepspeed.initialize fails in auto_ep_presets/base.py)")
    try:
        from deepspeed.module_inject.auto_ep_presets.registry import available_preset_names
    except ImportError as e:
        return f"this DeepSpeed has no AutoEP ({e})"
    if autoep_preset(family) is None:
        return f"AutoEP has no preset for {family} (its presets: {', '.join(available_preset_names())})"
    return None


def deepspeed_config(settings: HFBenchSettings) -> dict[str, Any]:
    """The DeepSpeed config every variant runs under (AutoEP adds its ``"expert_parallel"`` section)."""
    return {
        "train_micro_batch_size_per_gpu": settings.sizes.batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": settings.lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "managed_gradient_accumulation": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def replica_placement(load_E: torch.Tensor, num_ranks: int, extra_slots: int) -> Placement:
    """E experts and ``extra_slots`` more copies of the hot ones on ``num_ranks`` ranks, at most one copy of an
    expert per rank.

    Step 1: copies per expert, by ``plan_placement`` on E + X slots of one node (one each, the spare slots
    proportional to load), capped at one per rank. Step 2: the copies onto ranks, largest share of load first, each
    to the least loaded rank that does not hold that expert yet, one with room first (``ceil((E + X) / N)`` slots
    per rank).

    Args: load_E [E] tokens per expert; num_ranks N <= E + X; extra_slots X >= 1.
    Returns: the placement on one node of N ranks (a token's copy of an expert is any of its ranks, evenly).
    """
    e = load_E.numel()
    if not e <= num_ranks <= e + extra_slots:
        raise ValueError(f"{e} experts + {extra_slots} extra slots on {num_ranks} ranks: need E <= N <= E + X")
    planned = plan_placement(e, Topology.uniform(1, e + extra_slots), load=load_E)
    copies = [min(c, num_ranks) for c in planned.num_replicas]
    share = [float(load_E[x]) / copies[x] for x in range(e)]
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    room = math.ceil(sum(copies) / num_ranks)
    for x in sorted((x for x in range(e) for _ in range(copies[x])), key=lambda x: (-share[x], -copies[x], x)):
        r = min((r for r in range(num_ranks) if x not in held[r]),
                key=lambda r: (len(held[r]) >= room, rank_load[r], len(held[r]), r))
        held[r].append(x)
        rank_load[r] += share[x]
    return Placement(topology=Topology.uniform(1, num_ranks), num_experts=e,
                     rank_to_experts=tuple(tuple(sorted(h)) for h in held))


def train_step(engine: Any, ids_BS: torch.Tensor) -> torch.Tensor:
    """One training step; returns the loss."""
    ids_BS = ids_BS.to(engine.device)
    loss = engine(input_ids=ids_BS, labels=ids_BS).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def _large_ep_engine(model: nn.Module, ep_size: int, config: dict[str, Any], placement: Placement | None,
                     dynamic_replicas: int = 0) -> Any:
    """The model converted by the plugin's ``initialize`` through its ``"large_ep"`` section (``placement``: the
    replicas' layout; their gradients are summed over the replicas in the engine's step; ``dynamic_replicas``: spare
    slots for clones, re-planned after every step)."""
    from largeep_plugin.integrations.deepspeed.engine import initialize

    # Bias rate 0: every variant trains the same model the same way (AutoEP has no balancing bias).
    section = {"enabled": True, "ep_size": ep_size, "allow_colocate": True, "load_balance": {"bias_update_rate": 0.0},
               "dynamic_replicas": dynamic_replicas}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the colocation warning of the replicas' second slot
        return initialize(model=model, model_parameters=model.parameters(), config={**config, "large_ep": section},
                          placement=placement)[0]


def _autoep_engine(model: nn.Module, family: str, ep_size: int, config: dict[str, Any]) -> Any:
    import deepspeed

    blocks = len(moe_routers(model))
    section = {"enabled": True, "autoep_size": ep_size, "preset_model": autoep_preset(family)}
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                  config={**config, "expert_parallel": section})[0]
    converted = sum(type(m).__name__ == "AutoEPMoELayer" for m in engine.module.modules())
    if converted != blocks:
        raise NotImplementedError(f"AutoEP converted {converted} of the {blocks} MoE blocks of {family}")
    return engine


def build_variant(variant: str, settings: HFBenchSettings, router: str, ep_size: int,
                  placement: Placement | None) -> Any:
    """The DeepSpeed engine of ``variant`` around the bench model (``placement``: large_ep_replicas's layout)."""
    import deepspeed

    model = bench_model(settings.family, settings.experts(ep_size), settings.sizes, router, settings.seed,
                        settings.skew, settings.learn_steps, settings.zipf)
    config = deepspeed_config(settings)
    if variant == "unconverted":
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]
    if variant == "autoep":
        return _autoep_engine(model, settings.family, ep_size, config)
    return _large_ep_engine(model, ep_size, config, placement, dynamic_replicas=int(variant == "large_ep_dynamic"))

