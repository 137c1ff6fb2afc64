"""Record the router's load and expert co-activation during a run, for ``largeep plan --load/--coactivation``.

Shape legend:
    T  tokens      K  top_k      E  experts      L  MoE layers

Files written by ``RoutingRecorder.write(directory)`` (the formats ``largeep plan`` reads):
    load.json                      {"tokens_per_expert": [E ints]}              summed over layers
    load_layer<i>.json             {"tokens_per_expert": [E ints]}              MoE layer i
    coactivation.json              {"coactivation": [[E ints] x E]}             summed over layers
    coactivation_layer<i>.json     {"coactivation": [[E ints] x E]}             MoE layer i

``tokens_per_expert[e]`` counts (token, expert) assignments to e. ``coactivation[a][b]`` (a != b) counts tokens
that chose both a and b among their top-k; the matrix is symmetric and its diagonal is 0 (a token never picks
one expert twice). With top_k = 1 it is all zeros.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from largeep_plugin.layer.comm import ProcessGroup, group_size
from largeep_plugin.layer.moe_layer import LargeEPMoE, moe_layers


class RoutingRecorder:
    """Accumulates per-layer tokens per expert and co-activation counts from ``topk_ids_TK``.

    Args:
        num_experts: E.
        num_layers: L.
    """

    def __init__(self, num_experts: int, num_layers: int):
        if num_experts < 1 or num_layers < 1:
            raise ValueError(f"num_experts={num_experts} and num_layers={num_layers} must be >= 1")
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.tokens_per_expert_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.coactivation_LEE = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.int64)

    @torch.no_grad()
    def add(self, layer: int, topk_ids_TK: torch.Tensor) -> None:
        """Count one batch of routing decisions of MoE layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} is outside 0..{self.num_layers - 1}")
        ids_TK = topk_ids_TK.detach().to("cpu", torch.int64)
        self.tokens_per_expert_LE[layer] += torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
        # onehot_TE[t, e] = 1 when token t chose e; onehot^T onehot counts tokens per pair of experts.
        onehot_TE = torch.zeros(ids_TK.shape[0], self.num_experts, dtype=torch.float64)
        onehot_TE.scatter_(1, ids_TK, 1.0)
        pairs_EE = (onehot_TE.T @ onehot_TE).round().to(torch.int64)
        pairs_EE.fill_diagonal_(0)
        self.coactivation_LEE[layer] += pairs_EE

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Sum the counts of every rank of ``group`` (call on all ranks, once, before ``write``)."""
        if group_size(group) > 1:
            dist.all_reduce(self.tokens_per_expert_LE, group=group)
            dist.all_reduce(self.coactivation_LEE, group=group)

    def write(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the four kinds of file listed in the module docstring; returns the paths written."""
        os.makedirs(directory, exist_ok=True)
        paths = []

        def dump(name: str, obj: dict) -> None:
            path = os.path.join(os.fspath(directory), name)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(obj, f)
                f.write("\n")
            paths.append(path)

        dump("load.json", {"tokens_per_expert": self.tokens_per_expert_LE.sum(0).tolist()})
        dump("coactivation.json", {"coactivation": self.coactivation_LEE.sum(0).tolist()})
        for i in range(self.num_layers):
            dump(f"load_layer{i}.json", {"tokens_per_expert": self.tokens_per_expert_LE[i].tolist()})
            dump(f"coactivation_layer{i}.json", {"coactivation": self.coactivation_LEE[i].tolist()})
        return paths


def record_largeep_routing(model: nn.Module, recorder: RoutingRecorder) -> Callable[[], None]:
    """Feed ``recorder`` with the routing of every ``LargeEPMoE`` in ``model`` (in module order = layer index).

    A forward pre-hook recomputes the layer's top-k choice from its input (the router is deterministic, so this
    is exactly the choice the layer makes). Returns a function that removes the hooks.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if len(layers) != recorder.num_layers:
        raise ValueError(f"the model has {len(layers)} LargeEPMoE layers but the recorder expects {recorder.num_layers}")

    def hook_for(index: int, layer: LargeEPMoE) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple) -> None:
            x_TH = inputs[0].detach().reshape(-1, layer.config.hidden_size)
            with torch.no_grad():
                routing = layer.router(x_TH)
            recorder.add(index, routing.topk_ids_TK)

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i, layer)) for i, layer in enumerate(layers)]

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove
