"""The side-by-side benchmark (`largeep bench layer`, part 2 of `largeep demo`) runs all four variants on a small
world and writes its table, JSON and chart. Speeds are not asserted: they are measured by the benchmark itself."""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

from conftest import rel_err, world  # noqa: E402
from largeep_plugin.cli import main  # noqa: E402
from largeep_plugin.commands.bench_layer import stock_builder  # noqa: E402
from largeep_plugin.tools.layer_bench import (COLOCATED_VARIANTS, VARIANTS, LayerBenchSettings, _build, rank_tokens,  # noqa: E402
                                              router_weight)

SMALL = ["--tokens", "64", "--hidden-size", "16", "--ffn-hidden-size", "32", "--iters", "2", "--warmup", "1"]


def test_bench_layer_writes_rows_for_every_variant(tmp_path, capsys):
    assert main(["bench", "layer", "--ep", "2,4", *SMALL, "--skew", "1.0", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stock_dropless" in out and "ideal" in out
    data = json.loads((tmp_path / "layer_bench.json").read_text())
    assert [(r["ep"], r["variant"]) for r in data["rows"]] == [(ep, v) for ep in (2, 4) for v in VARIANTS]
    for r in data["rows"]:
        assert r["tokens_per_s_per_rank"] > 0 and len(r["step_seconds"]) == 2
        assert r["peak_growth_mib"] is None or r["peak_growth_mib"] >= 0
    # The skew makes expert 0 hot: the routing is visibly imbalanced, and the stock layer pads to its largest count.
    ep4 = [r for r in data["rows"] if r["ep"] == 4][0]
    assert ep4["imbalance"] > 1.3 and ep4["stock_padding"] >= ep4["imbalance"] - 1e-6
    assert [r["ep"] for r in data["ratios"]] == [2, 4]
    assert set(data["ratios"][0]) == {"ep", "large_ep_over_stock_dropless", "large_ep_over_stock_cf1",
                                      "large_ep_over_ideal"}
    assert (tmp_path / "layer_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_layer_rejects_bad_flags(capsys):
    assert main(["bench", "layer", "--variants", "large_ep,fastest", "--output", "unused"]) == 2
    assert "fastest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: before any rank starts
        main(["bench", "layer", "--top-k", "3", "--output", "unused"])
    assert exc.value.code == 2 and "argument --top-k: invalid choice: 3" in capsys.readouterr().err


def _variants_rank(rank: int, world_size: int, build_stock: Any) -> dict[str, Any]:
    """Every variant as the benchmark builds it on this rank: its tokens, its weights, and (the two dropless
    layers, which compute the same function when their weights agree) its output and input gradient."""
    s = LayerBenchSettings(hidden_size=8, ffn_hidden_size=16, tokens_per_rank=12, skew=0.5, seed=3)
    weight_EH = router_weight(s, world_size)
    built = {v: _build(v, s, rank, world_size, weight_EH, build_stock) for v in VARIANTS}
    x_TH, dy_TH = rank_tokens(s, rank)
    out: dict[str, Any] = {}
    for v, (_, x, dy) in built.items():
        reps = s.top_k if v == "ideal" else 1  # ideal: each rank's expert on T*K rows
        out[f"tokens:{v}"] = torch.equal(x.detach(), x_TH.repeat(reps, 1)) and torch.equal(dy, dy_TH.repeat(reps, 1))
    large, ideal = built["large_ep"][0], built["ideal"][0]
    out["gate:large_ep"] = torch.equal(large.router.weight, weight_EH)
    for v in ("stock_dropless", "stock_cf1"):
        moe = built[v][0].moe.deepspeed_moe
        out[f"gate:{v}"] = torch.equal(moe.gate.wg.weight, weight_EH)
        fc1, _, fc2 = moe.experts.deepspeed_experts[0]
        out[f"expert:{v}"] = (torch.equal(fc1.weight, large.expert.fc1.weight)
                              and torch.equal(fc2.weight, large.expert.fc2.weight))
    out["expert:ideal"] = all(torch.equal(a, b) for a, b in zip(ideal.parameters(), large.expert.parameters()))
    ys = {}
    for v in ("stock_dropless", "large_ep"):
        layer, x, dy = built[v]
        y = layer(x)
        y.backward(dy)
        ys[v] = (y.detach(), x.grad.clone())
    # The colocated variants: 8 experts per rank under the same tokens and skew; loop and grouped GEMMs agree.
    for v in COLOCATED_VARIANTS:
        layer, x, dy = _build(v, s, rank, world_size, weight_EH, build_stock)
        out[f"tokens:{v}"] = torch.equal(x.detach(), x_TH)
        out[f"gate:{v}"] = torch.equal(layer.router.weight, router_weight(s, 8 * world_size))
        out[f"experts:{v}"] = layer.expert_ids == tuple(range(8 * rank, 8 * rank + 8))
        y = layer(x)
        y.backward(dy)
        ys[v] = (y.detach(), x.grad.clone())
    out["colocated_y"] = rel_err(ys["colocated8_gemm"][0], ys["colocated8"][0])
    out["colocated_dx"] = rel_err(ys["colocated8_gemm"][1], ys["colocated8"][1])
    out["y"] = rel_err(ys["stock_dropless"][0], ys["large_ep"][0])
    out["dx"] = rel_err(ys["stock_dropless"][1], ys["large_ep"][1])
    out["y_scale"] = float(ys["large_ep"][0].abs().max())
    return out


def test_every_variant_gets_the_same_tokens_and_weights():
    results = world(_variants_rank, 2, stock_builder(["stock_dropless"]), timeout=180)
    for rank, r in enumerate(results):
        same = {k: v for k, v in r.items() if ":" in k}
        assert all(same.values()), (rank, same)
        # The same tokens through the same weights: the dropless stock layer and large-EP agree.
        assert r["y"] < 1e-5 and r["dx"] < 1e-5 and r["y_scale"] > 1e-3, (rank, r)
        assert r["colocated_y"] < 1e-5 and r["colocated_dx"] < 1e-5, (rank, r)
    # Each rank has its own tokens, and the skew is in the gate weight every variant gets.
    s = LayerBenchSettings(hidden_size=8, ffn_hidden_size=16, tokens_per_rank=12, skew=0.5, seed=3)
    assert not torch.equal(rank_tokens(s, 0)[0], rank_tokens(s, 1)[0])
    assert router_weight(s, 4)[:, 0].tolist() == pytest.approx([-0.5 * x for x in (0.0, 0.6931472, 1.0986123,
                                                                                    1.3862944)])


def test_demo_runs_the_comparison(tmp_path, capsys):
    argv = ["demo", "--world-size", "2", "--steps", "3", "--num-layers", "1", "--batch-size", "2", "--seq-len", "8",
            "--hidden-size", "16", "--ffn-hidden-size", "16", "--no-progress", "--output-dir", str(tmp_path),
            "--compare-ep", "2", "--compare-tokens", "32", "--compare-hidden-size", "16",
            "--compare-ffn-hidden-size", "16", "--compare-iters", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "EP  2: large-EP = " in out and "x stock dropless" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["training"]["losses"]) == 3
    assert [r["variant"] for r in summary["comparison_rows"]] == list(VARIANTS)
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "comparison.json").exists()
