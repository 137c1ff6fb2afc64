"""The side-by-side benchmark (`largeep bench layer`, part 2 of `largeep demo`) runs all four variants on a small
world and writes its table, JSON and chart. Speeds are not asserted: they are measured by the benchmark itself."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("deepspeed")

from largeep_plugin.cli import main  # noqa: E402
from largeep_plugin.tools.layer_bench import VARIANTS, LayerBenchSettings, rank_tokens, router_weight  # noqa: E402

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
    assert main(["bench", "layer", "--top-k", "3", "--output", "unused"]) == 2
    assert "top_k=3" in capsys.readouterr().err


def test_same_tokens_and_weights_for_every_variant():
    s = LayerBenchSettings(hidden_size=8, ffn_hidden_size=8, tokens_per_rank=5, skew=0.5)
    a, _ = rank_tokens(s, rank=3)
    b, _ = rank_tokens(s, rank=3)
    assert (a == b).all() and not (a == rank_tokens(s, rank=2)[0]).all()
    w = router_weight(s, 4)
    assert w[:, 0].tolist() == pytest.approx([-0.5 * x for x in (0.0, 0.6931472, 1.0986123, 1.3862944)])


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
