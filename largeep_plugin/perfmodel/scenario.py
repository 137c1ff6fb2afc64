"""A scenario: a model, a cluster, workloads, the layouts to compare and, optionally, claimed numbers.

A scenario file (presets/source.yaml is one) names its model and cluster files (or preset names):

    model: source_model              # a ModelSpec file or preset name
    cluster: h100_2x8                # a ClusterSpec file or preset name
    nodes: 2                         # optional: overrides the cluster's node count
    training: {seq_len: 10000, global_batch: 1024, precision: fp16}   # TrainingWorkload fields
    decode: {batch: 1024, context: 10000, precision: fp16}            # DecodeWorkload fields (optional)
    layouts: [ep16, tp8pp2]
    claims:                          # optional: numbers someone claimed, printed beside the prediction
      ep16: {tokens_per_s: 450000, ms_per_token: 2.2}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from largeep_plugin.perfmodel.layout import Layout, parse_layout
from largeep_plugin.perfmodel.specs import (ClusterSpec, ModelSpec, from_mapping, load_cluster, load_model,
                                            load_yaml, resolve_preset_path)
from largeep_plugin.perfmodel.workload import DecodeWorkload, TrainingWorkload

_KEYS = ("name", "model", "cluster", "nodes", "training", "decode", "layouts", "claims", "description")
_CLAIM_KEYS = ("tokens_per_s", "ms_per_token")


@dataclass(frozen=True, kw_only=True)
class Claim:
    """Numbers claimed for one layout: training tokens/s and decode milliseconds per output token."""

    tokens_per_s: float | None = None
    ms_per_token: float | None = None


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    description: str
    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingWorkload | None
    decode: DecodeWorkload | None
    layouts: tuple[Layout, ...]
    claims: Mapping[str, Claim] = field(default_factory=dict)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario file or preset name; model and cluster paths resolve next to the file, then as presets."""
    p = resolve_preset_path(path)
    data = load_yaml(p)
    unknown = sorted(k for k in data if k not in _KEYS)
    if unknown:
        raise ValueError(f"{p}: unknown scenario key(s) {unknown}; valid keys are {sorted(_KEYS)}")
    for key in ("model", "cluster", "layouts"):
        if key not in data:
            raise ValueError(f"{p}: scenario is missing required key {key!r}")
    model = load_model(_near(p, data["model"]))
    cluster = load_cluster(_near(p, data["cluster"]), nodes=data.get("nodes"))
    training = from_mapping(TrainingWorkload, data["training"], "training.") if "training" in data else None
    decode = from_mapping(DecodeWorkload, data["decode"], "decode.") if "decode" in data else None
    layouts = data["layouts"]
    if not isinstance(layouts, list) or not layouts:
        raise ValueError(f"{p}: layouts must be a non-empty list like [ep16, tp8pp2]")
    claims_raw: Any = data.get("claims", {}) or {}
    claims: dict[str, Claim] = {}
    for layout_name, c in claims_raw.items():
        if not isinstance(c, Mapping) or any(k not in _CLAIM_KEYS for k in c):
            raise ValueError(f"{p}: claims.{layout_name} must be a mapping with keys from {list(_CLAIM_KEYS)}")
        claims[parse_layout(str(layout_name)).name] = Claim(**{k: float(v) for k, v in c.items()})
    return Scenario(name=str(data.get("name", p.stem)), description=str(data.get("description", "")),
                    model=model, cluster=cluster, training=training, decode=decode,
                    layouts=tuple(parse_layout(str(x)) for x in layouts), claims=claims)


def _near(scenario_path: Path, ref: str) -> str:
    """A file referenced by a scenario: relative to the scenario's folder if it exists there, else as given."""
    candidate = scenario_path.parent / str(ref)
    return str(candidate) if candidate.is_file() else str(ref)
