"""Load bookkeeping: imbalance, the balancing bias, the balancing losses, and the per-step JSON monitor."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from conftest import HIDDEN, make_config, world
from largeep_plugin.layer.load_balance import (
    LoadMonitor, LoadStats, imbalance, read_monitor, switch_aux_loss, update_expert_bias, z_loss,
)
from largeep_plugin.layer.moe_layer import LargeEPMoE, load_stats, moe_layers, update_expert_biases


def test_imbalance() -> None:
    assert imbalance(torch.tensor([3, 1, 1, 1])) == 2.0
    assert imbalance(torch.tensor([2, 2, 2])) == 1.0
    assert imbalance(torch.tensor([0, 0, 0])) == 1.0


def test_update_expert_bias_moves_towards_the_mean() -> None:
    bias = torch.tensor([0.5, 0.0, 0.0, -0.5])
    update_expert_bias(bias, torch.tensor([4, 0, 2, 2]), 0.1)  # mean 2
    torch.testing.assert_close(bias, torch.tensor([0.4, 0.1, 0.0, -0.5]))


def test_switch_aux_loss_by_hand() -> None:
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    counts = torch.tensor([1, 2, 1])
    f = torch.tensor([0.25, 0.5, 0.25])
    p = torch.tensor([0.4, 0.4, 0.2])
    torch.testing.assert_close(switch_aux_loss(scores, counts, 2, "softmax"), 3 * (f * p).sum())
    sig = torch.tensor([[0.8, 0.4, 0.8]])  # sigmoid scores are normalised per token first
    torch.testing.assert_close(
        switch_aux_loss(sig, counts, 2, "sigmoid"), 3 * (f * torch.tensor([0.4, 0.2, 0.4])).sum()
    )


def test_z_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    lse = torch.tensor([math.log(2.0), math.log(math.e + 1 / math.e)])
    torch.testing.assert_close(z_loss(logits), lse.square().mean())


def test_monitor_writes_one_line_per_log(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "load.jsonl"
    stats = LoadStats(
        tokens_per_expert_E=torch.tensor([6, 2, 0, 0]), dropped=torch.tensor(3),
        aux_loss=torch.tensor(0.25), z_loss=torch.tensor(0.0),
    )
    with LoadMonitor(path) as mon:
        mon.log(0, "layers.0.mlp", stats)
        mon.log(1, "layers.0.mlp", stats)
    with LoadMonitor(path) as mon:  # appends
        mon.log(2, "layers.1.mlp", stats)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["step"] == 0 and first["layer"] == "layers.0.mlp"
    assert first["counts"] == [6, 2, 0, 0] and first["imbalance"] == 3.0 and first["drops"] == 3
    assert [r["step"] for r in read_monitor(path)] == [0, 1, 2]


def _monitor_rank(rank: int, world_size: int, path: str) -> list[dict[str, object]]:
    cfg = make_config(world_size, capacity_factor=0.5)
    model = nn.Sequential(LargeEPMoE(cfg), nn.Linear(HIDDEN, HIDDEN), LargeEPMoE(cfg))
    seen = []
    mon = LoadMonitor(path) if rank == 0 else None  # counts are global: one rank writes
    for step in range(3):
        model(torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(10 * step + rank)))
        for name, layer in moe_layers(model):
            s = layer.last_stats
            seen.append({"step": step, "layer": name, "counts": s.tokens_per_expert_E.tolist(), "drops": int(s.dropped)})
        if mon is not None:
            mon.log_model(step, moe_layers(model))
    if mon is not None:
        mon.close()
    assert sorted(load_stats(model)) == ["0", "2"]
    return seen


def test_monitor_logs_every_step_and_layer_with_global_counts(tmp_path: Path) -> None:
    path = tmp_path / "load.jsonl"
    per_rank = world(_monitor_rank, 2, str(path))
    assert per_rank[0] == per_rank[1], "every rank sees the same global counts and drops"
    records = read_monitor(path)
    assert [(r["step"], r["layer"]) for r in records] == [(s, n) for s in range(3) for n in ("0", "2")]
    for rec, seen in zip(records, per_rank[0]):
        assert rec["counts"] == seen["counts"] and rec["drops"] == seen["drops"]
        assert sum(rec["counts"]) == 2 * 10 * 2  # ranks x tokens x top_k
        assert math.isclose(rec["imbalance"], max(rec["counts"]) / (sum(rec["counts"]) / 2))
        assert set(rec) >= {"step", "layer", "counts", "imbalance", "drops"}
    assert any(r["drops"] > 0 for r in records)


def _balance_rank(rank: int, world_size: int, steps: int) -> dict[str, object]:
    cfg = make_config(world_size, top_k=1, score_function="sigmoid", bias_update_rate=0.02)
    model = nn.Sequential(LargeEPMoE(cfg))
    layer = model[0]
    # Skew: inputs have a positive mean and expert 0's router row points along it, so expert 0 is hot.
    with torch.no_grad():
        layer.router.weight[0] += 0.5
    history = []
    for step in range(steps):
        x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(1000 * step + rank)) + 0.5
        # Training forwards (grad enabled): evaluation and no-grad forwards do not count towards the bias.
        layer(x)
        layer(x.flip(0))  # two micro-batches per step: the update uses both
        assert torch.equal(layer.tokens_per_expert_since_update, 2 * layer.last_stats.tokens_per_expert_E)
        history.append(layer.last_stats.imbalance)
        assert update_expert_biases(model) == 1
        assert not bool(layer.tokens_per_expert_since_update.any())
    return {"imbalance": history, "bias": layer.router.expert_bias.tolist()}


def test_bias_updates_move_a_skewed_load_towards_balance() -> None:
    results = world(_balance_rank, 4, 30)
    history = results[0]["imbalance"]
    assert all(r["bias"] == results[0]["bias"] for r in results), "the bias must be identical on every rank"
    assert all(r["imbalance"] == history for r in results)
    start, end = history[0], sum(history[-10:]) / 10
    assert start > 2.5, f"the router is meant to start skewed, imbalance {start}"
    assert end < 1.6 and end < 0.5 * start, f"imbalance went from {start:.2f} to {end:.2f}: {history}"
    bias = results[0]["bias"]
    assert bias[0] < 0 and bias[0] == min(bias), "the hot expert's bias must have gone down the most"
