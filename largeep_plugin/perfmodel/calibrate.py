"""Calibration: replace assumed constants with measured ones, and compare predicted layer times with measured.

A calibration file is JSON in SI units (it is written by programs), format "largeep-calibration/1":

    {
      "format": "largeep-calibration/1",
      "source": "what ran, where, when",
      "device": {                                   # one GPU (or one CPU rank); every key optional
        "name": "cpu rank (4 gloo ranks on 2 cores)",
        "gemm_flops_per_s": {"fp32": 2.1e10},        # sustained GEMM rate per precision
        "attention_flops_per_s": {"bf16": 3.3e14},   # sustained flash-attention rate
        "memory_bytes_per_s": 6.0e9,                 # sustained streaming bandwidth
        "memory_bytes": 1.6e10                       # capacity
      },
      "links": {                                     # per GPU and direction; either entry optional
        "intra_node": {"bandwidth_bytes_per_s": 1.2e9, "latency_s": 6e-5},
        "inter_node": {"bandwidth_bytes_per_s": 1.25e8, "latency_s": 1.2e-4}
      },
      "topology": {"nodes": 2, "gpus_per_node": 4}, # optional: the world the layers below ran on
      "layers": [                                    # optional: measured MoE layer times
        {"name": "ep4-h512", "hidden_size": 512, "ffn_hidden_size": 2048, "num_experts": 4, "top_k": 2,
         "activation": "gelu", "tokens_per_rank": 512, "ep": 4, "precision": "fp32", "dispatch": "flat",
         "overlap_chunks": 1, "imbalance": 1.0,
         "measured_s": {"forward": 0.05, "backward": 0.1, "total": 0.15}}
      ]
    }

apply_calibration() returns the cluster with the measured rates in place of peak x efficiency (their
efficiencies become 1.0); anything the file does not measure keeps its assumed value. layer_predictions()
predicts each measured layer on the calibrated cluster: the benchmark benchmarks/perfmodel_calibration.py and
the emulated cluster write such files, and `largeep simulate --calibration FILE` prints the comparison.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from largeep_plugin.perfmodel import flops
from largeep_plugin.placement.files import read_json
from largeep_plugin.perfmodel.costs import gemm_time, memory_time, pipelined_time
from largeep_plugin.perfmodel.layer import act_bytes, moe_block_time
from largeep_plugin.perfmodel.layout import Layout
from largeep_plugin.perfmodel.specs import (PRECISIONS, AttentionSpec, ClusterSpec, EfficiencySpec, GPUSpec,
                                            LinkSpec, ModelSpec, MoESpec)

FORMAT = "largeep-calibration/1"
_LAYER_KEYS = {"name", "hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "tokens_per_rank",
               "ep", "precision", "dispatch", "overlap_chunks", "imbalance", "measured_s", "nodes"}


def read_calibration(path: str | Path) -> dict[str, Any]:
    """Load and check a calibration file; ValueError naming the bad entry."""
    data = read_json(path)
    check_calibration(data, str(path))
    return data


def check_calibration(data: Any, where: str = "calibration") -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where}: expected a JSON object with \"format\": \"{FORMAT}\"")
    unknown = sorted(set(data) - {"format", "source", "device", "links", "topology", "layers"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}")
    dev = data.get("device", {})
    for key in ("gemm_flops_per_s", "attention_flops_per_s"):
        for prec, v in dev.get(key, {}).items():
            if prec not in PRECISIONS:
                raise ValueError(f"{where}: device.{key} key {prec!r} is not one of {list(PRECISIONS)}")
            _positive(f"{where}: device.{key}.{prec}", v)
    for key in ("memory_bytes_per_s", "memory_bytes"):
        if key in dev:
            _positive(f"{where}: device.{key}", dev[key])
    for name, link in data.get("links", {}).items():
        if name not in ("intra_node", "inter_node"):
            raise ValueError(f"{where}: links.{name} is not intra_node or inter_node")
        _positive(f"{where}: links.{name}.bandwidth_bytes_per_s", link.get("bandwidth_bytes_per_s"))
        lat = link.get("latency_s")
        if not isinstance(lat, (int, float)) or isinstance(lat, bool) or not (math.isfinite(lat) and lat >= 0):
            raise ValueError(f"{where}: links.{name}.latency_s={lat!r} must be a number >= 0")
    for i, layer in enumerate(data.get("layers", [])):
        unknown = sorted(set(layer) - _LAYER_KEYS)
        if unknown:
            raise ValueError(f"{where}: layers[{i}] has unknown key(s) {unknown}; valid keys {sorted(_LAYER_KEYS)}")
        for key in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "tokens_per_rank", "ep",
                    "measured_s"):
            if key not in layer:
                raise ValueError(f"{where}: layers[{i}] is missing {key!r}")


def _positive(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}={v!r} must be a number > 0")


def apply_calibration(cluster: ClusterSpec, data: Mapping[str, Any]) -> ClusterSpec:
    """`cluster` with every constant the calibration measured replaced by the measurement (efficiency 1.0)."""
    check_calibration(data)
    dev, links = data.get("device", {}), data.get("links", {})
    gpu, eff = cluster.gpu, cluster.efficiency
    gemm = dev.get("gemm_flops_per_s", {})
    if gemm:
        peaks = {k: v for k, v in gpu.peak_TFLOPs.items() if k not in gemm}
        peaks.update({k: v / 1e12 for k, v in gemm.items()})
        gemm_eff = dict(eff.gemm)
        gemm_eff.update({k: 1.0 for k in gemm})
        gpu = dataclasses.replace(gpu, peak_TFLOPs=peaks)
        eff = dataclasses.replace(eff, gemm=gemm_eff)
    attn = dev.get("attention_flops_per_s", {})
    if attn:
        # One attention efficiency applies to all precisions: take it relative to the (possibly new) peak.
        prec, rate = next(iter(attn.items()))
        base = "bf16" if prec == "fp8" else prec
        eff = dataclasses.replace(eff, attention=min(1.0, rate / gpu.peak_flops(base)))
    if "memory_bytes_per_s" in dev:
        gpu = dataclasses.replace(gpu, hbm_TB_per_s=dev["memory_bytes_per_s"] / 1e12)
        eff = dataclasses.replace(eff, memory=1.0)
    if "memory_bytes" in dev:
        gpu = dataclasses.replace(gpu, memory_GB=dev["memory_bytes"] / 1e9)
    intra, inter = cluster.intra_node, cluster.inter_node
    if "intra_node" in links:
        intra = _link(links["intra_node"])
        eff = dataclasses.replace(eff, intra_node_link=1.0)
    if "inter_node" in links:
        inter = _link(links["inter_node"])
        eff = dataclasses.replace(eff, inter_node_link=1.0)
    return dataclasses.replace(cluster, gpu=gpu, intra_node=intra, inter_node=inter, efficiency=eff)


def _link(d: Mapping[str, float]) -> LinkSpec:
    return LinkSpec(bandwidth_GB_per_s=d["bandwidth_bytes_per_s"] / 1e9, latency_us=d["latency_s"] * 1e6)


def cluster_from_calibration(data: Mapping[str, Any], name: str = "calibrated") -> ClusterSpec:
    """A cluster made only of measurements (for predicting the measured layers). A missing link class takes
    the other's values; a missing capacity is 1 TB (layer predictions do not check memory)."""
    check_calibration(data)
    dev, links, topo = data.get("device", {}), data.get("links", {}), data.get("topology", {})
    if not dev.get("gemm_flops_per_s") or "memory_bytes_per_s" not in dev or not links:
        raise ValueError("predicting layers needs device.gemm_flops_per_s, device.memory_bytes_per_s and at "
                         "least one link in the calibration")
    intra = links.get("intra_node", links.get("inter_node"))
    inter = links.get("inter_node", intra)
    base = ClusterSpec(
        name=name,
        gpu=GPUSpec(name=str(dev.get("name", "measured device")), peak_TFLOPs={"fp32": 1.0}, hbm_TB_per_s=1.0,
                    memory_GB=1000.0),
        nodes=int(topo.get("nodes", 1)), gpus_per_node=int(topo.get("gpus_per_node", 1)),
        intra_node=_link(intra), inter_node=_link(inter),
        efficiency=EfficiencySpec(intra_node_link=1.0, inter_node_link=1.0, overlap_slowdown=0.0,
                                  kernel_overhead_us=0.0, memory_reserve_GB=0.0))
    return apply_calibration(base, {"format": FORMAT, "device": dev})


@dataclass(frozen=True, kw_only=True)
class LayerPrediction:
    name: str
    predicted_s: Mapping[str, float]
    measured_s: Mapping[str, float]

    def error(self, key: str = "total") -> float:
        return self.predicted_s[key] / self.measured_s[key] - 1.0


def layer_model(entry: Mapping[str, Any]) -> ModelSpec:
    """A one-layer MoE model with the shape of a measured layer (its attention is not part of the layer)."""
    return ModelSpec(name=str(entry.get("name", "layer")), hidden_size=int(entry["hidden_size"]), num_layers=1,
                     attention=AttentionSpec(num_heads=1, head_dim=1),
                     moe=MoESpec(num_experts=int(entry["num_experts"]), top_k=int(entry["top_k"]),
                                 ffn_hidden_size=int(entry["ffn_hidden_size"]),
                                 activation=str(entry.get("activation", "gelu"))))


def predict_moe_layer(entry: Mapping[str, Any], cluster: ClusterSpec) -> dict[str, float]:
    """Forward, backward and total seconds of one MoE layer (router, permute, dispatch, experts, combine,
    unpermute; no attention) for the entry's shape on `cluster` (the busiest rank)."""
    model = layer_model(entry)
    ep = int(entry["ep"])
    layout = Layout(ep=ep)
    p = str(entry.get("precision", "fp32"))
    chunks = int(entry.get("overlap_chunks", 1))
    tokens = float(entry["tokens_per_rank"])
    block = moe_block_time(model, cluster, layout, tokens=tokens, precision=p,
                           overlap="chunked" if chunks > 1 else "none", overlap_chunks=chunks,
                           dispatch=str(entry.get("dispatch", "flat")), imbalance=float(entry.get("imbalance", 1.0)))
    h, ab = model.hidden_size, act_bytes(p)
    router = gemm_time(cluster, p, 2.0 * tokens * flops.router_params(model), tokens * h * ab)
    k, f, mats = model.moe.top_k, model.moe.ffn_hidden_size, model.moe.matrices
    rows = tokens * k * float(entry.get("imbalance", 1.0))
    # permute + unpermute (read/write H per copy and per token) and the activation function, forward.
    ew = memory_time(cluster, ((1 + k) * h * 2 * tokens + rows * mats * f) * ab)
    fwd = router + ew + pipelined_time(block.dispatch_fwd, block.expert_fwd, block.combine_fwd, chunks)
    total = 3.0 * (router + ew) + block.total
    return {"forward": fwd, "backward": total - fwd, "total": total}


def layer_predictions(data: Mapping[str, Any], cluster: ClusterSpec | None = None) -> list[LayerPrediction]:
    """Predicted against measured time of every layer in a calibration (on its own measured constants unless a
    cluster is given)."""
    c = cluster or cluster_from_calibration(data)
    out = []
    for entry in data.get("layers", []):
        nodes = int(entry.get("nodes", c.nodes))
        c_entry = c if nodes == c.nodes else dataclasses.replace(c, nodes=nodes,
                                                                 gpus_per_node=max(1, int(entry["ep"]) // nodes))
        pred = predict_moe_layer(entry, c_entry)
        measured = {k: float(v) for k, v in entry["measured_s"].items() if k in pred}
        out.append(LayerPrediction(name=str(entry.get("name", "layer")), predicted_s=pred, measured_s=measured))
    return out
