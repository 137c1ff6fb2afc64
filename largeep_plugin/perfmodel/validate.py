"""Validation against published training numbers (presets/validation.yaml).

Each case names a model, a cluster, the published layout and workload, and the published TFLOP/s per GPU (and
tokens/s per GPU when given). Roles:
    anchor       a check of the kernel efficiencies on a run without experts or overlap to blame
    overlap_fit  a pair (this case and its `baseline`, the same run without the overlap) from which the share
                 of the all-to-all that a cross-batch schedule really hides is fitted
    validation   a prediction compared with the published figure; the tests require it within 30%
TFLOP/s are computed with the publisher's FLOP count: causal attention, or full S x S (count_causal: false) as
Megatron-Core 0.9 counted it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeep_plugin.perfmodel.layout import Layout, parse_layout
from largeep_plugin.perfmodel.specs import ClusterSpec, ModelSpec, from_mapping, load_cluster, load_model, load_yaml
from largeep_plugin.perfmodel.training import TrainingResult, simulate_training
from largeep_plugin.perfmodel.workload import TrainingWorkload

ROLES = ("anchor", "overlap_fit", "validation")
_KEYS = ("name", "role", "model", "cluster", "nodes", "layout", "training", "published_tflops",
         "published_tokens_per_gpu", "count_causal", "baseline", "source", "notes")


@dataclass(frozen=True, kw_only=True)
class ValidationCase:
    name: str
    role: str
    model: ModelSpec
    cluster: ClusterSpec
    layout: Layout
    training: TrainingWorkload
    published_tflops: float
    published_tokens_per_gpu: float | None
    count_causal: bool
    baseline: str | None
    source: str
    notes: str


@dataclass(frozen=True, kw_only=True)
class ValidationRow:
    case: ValidationCase
    result: TrainingResult

    @property
    def predicted_tflops(self) -> float:
        return self.result.tflops_per_gpu

    @property
    def error(self) -> float:
        """Relative error of the predicted TFLOP/s per GPU: (predicted - published) / published."""
        return self.predicted_tflops / self.case.published_tflops - 1.0


def load_validation(path: str | Path = "validation") -> list[ValidationCase]:
    """The cases of a validation file (default: the shipped presets/validation.yaml)."""
    data = load_yaml(path)
    cases = []
    for i, raw in enumerate(data.get("cases", [])):
        unknown = sorted(k for k in raw if k not in _KEYS)
        if unknown:
            raise ValueError(f"validation case {i}: unknown key(s) {unknown}; valid keys are {sorted(_KEYS)}")
        if raw.get("role") not in ROLES:
            raise ValueError(f"validation case {i}: role={raw.get('role')!r} is not one of {list(ROLES)}")
        cases.append(ValidationCase(
            name=str(raw["name"]), role=raw["role"], model=load_model(raw["model"]),
            cluster=load_cluster(raw["cluster"], nodes=raw.get("nodes")), layout=parse_layout(str(raw["layout"])),
            training=from_mapping(TrainingWorkload, raw["training"], "training."),
            published_tflops=float(raw["published_tflops"]),
            published_tokens_per_gpu=_opt_float(raw.get("published_tokens_per_gpu")),
            count_causal=bool(raw.get("count_causal", True)), baseline=raw.get("baseline"),
            source=str(raw.get("source", "")), notes=str(raw.get("notes", ""))))
    if not cases:
        raise ValueError(f"validation file {path}: no cases")
    return cases


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def with_cross_batch_overlap(cluster: ClusterSpec, value: float) -> ClusterSpec:
    return dataclasses.replace(cluster, efficiency=dataclasses.replace(cluster.efficiency,
                                                                       cross_batch_overlap=value))


def run_case(case: ValidationCase, cluster: ClusterSpec | None = None) -> ValidationRow:
    result = simulate_training(case.model, cluster or case.cluster, case.layout, case.training,
                               count_causal=case.count_causal)
    return ValidationRow(case=case, result=result)


def fit_cross_batch_overlap(case: ValidationCase, baseline: ValidationCase) -> float:
    """The efficiency.cross_batch_overlap in [0, 1] at which the model's speed-up of `case` over `baseline`
    equals the published one (bisection; the speed-up grows with the value). Clamped to the interval ends."""
    target = case.published_tflops / baseline.published_tflops
    base = run_case(baseline).result.tokens_per_s

    def speedup(v: float) -> float:
        return run_case(case, with_cross_batch_overlap(case.cluster, v)).result.tokens_per_s / base

    lo, hi = 0.0, 1.0
    if speedup(hi) <= target:
        return hi
    if speedup(lo) >= target:
        return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if speedup(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def run_validation(path: str | Path = "validation") -> tuple[list[ValidationRow], dict[str, float]]:
    """All rows of the validation file, plus the fitted cross_batch_overlap per overlap_fit case."""
    cases = load_validation(path)
    by_name = {c.name: c for c in cases}
    fits = {}
    for c in cases:
        if c.role == "overlap_fit":
            if c.baseline not in by_name:
                raise ValueError(f"validation case {c.name!r}: baseline {c.baseline!r} is not a case name")
            fits[c.name] = fit_cross_batch_overlap(c, by_name[c.baseline])
    return [run_case(c) for c in cases], fits
