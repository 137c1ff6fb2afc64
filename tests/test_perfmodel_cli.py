"""`largeep simulate`, the PNG charts and calibration files."""
from __future__ import annotations

import argparse
import json

import pytest

from largeep_plugin.cli import build_parser, main
from largeep_plugin.commands import simulate as simulate_cmd
from largeep_plugin.perfmodel.calibrate import (FORMAT, apply_calibration, cluster_from_calibration,
                                                layer_predictions, predict_moe_layer, read_calibration)
from largeep_plugin.perfmodel.specs import load_cluster

PNG = b"\x89PNG\r\n\x1a\n"


def test_help_explains_every_flag():
    sub = argparse.ArgumentParser().add_subparsers()
    parser = simulate_cmd.add_parser(sub)
    for action in parser._actions:
        assert action.help, f"flag {action.option_strings} has no help text"
    assert "simulate" in build_parser().format_help()


def test_preset_source_prints_the_comparison(capsys):
    assert main(["simulate", "--preset", "source"]) == 0
    out = capsys.readouterr().out
    for text in ("claimed training tokens/s", "450,000", "120,000", "ceiling at 100% MFU", "floor ms, batch 1",
                 "CANNOT HOLD", "PESSIMISTIC", "speed-up ep16 over tp8pp2: claimed 3.75x"):
        assert text in out, text


def test_model_cluster_layout_json_and_plots(tmp_path, capsys):
    out_json = tmp_path / "sim.json"
    rc = main(["simulate", "--model", "mixtral_8x7b", "--cluster", "h100_2x8", "--nodes", "8",
               "--layout", "pp4ep8dp2vpp8,tp2pp4ep8dp2", "--seq-len", "4096", "--global-batch", "256",
               "--batch", "64", "--context", "4096", "--ep-sweep", "--plot-dir", str(tmp_path),
               "--json", str(out_json)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert [r["layout"]["ep"] for r in data["training"]] == [8, 8]
    assert len(data["decode"]) == 2 and data["ep_sweep"]
    for name in ("mixtral-8x7b_breakdown.png", "mixtral-8x7b_ep_sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert "ms per output token" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(capsys, tmp_path):
    assert main(["simulate", "--preset", "source", "--layout", "ep32"]) == 2
    assert "needs 32 GPUs" in capsys.readouterr().err
    bad = tmp_path / "cluster.yaml"
    bad.write_text("name: c\nnodes: 2\ngpus_per_node: 8\ngpu: {name: g, peak_TFLOPs: {bf16: 989}, hbm_TB_per_s: 3,"
                   " memory_GB: 80}\nintra_node: {bandwidth_GB_per_s: 450, latency_us: 5}\n"
                   "inter_node: {bandwidth_GB_per_s: 0, latency_us: 5}\n")
    assert main(["simulate", "--preset", "source", "--cluster", str(bad)]) == 2
    assert "inter_node: bandwidth_GB_per_s=0" in capsys.readouterr().err


def _calibration(tmp_path):
    data = {
        "format": FORMAT, "source": "synthetic",
        "device": {"name": "cpu", "gemm_flops_per_s": {"fp32": 5e10}, "memory_bytes_per_s": 1e10},
        "links": {"intra_node": {"bandwidth_bytes_per_s": 1e9, "latency_s": 1e-4}},
        "topology": {"nodes": 1, "gpus_per_node": 4},
        "layers": [{"name": "l", "hidden_size": 256, "ffn_hidden_size": 1024, "num_experts": 4, "top_k": 2,
                    "tokens_per_rank": 256, "ep": 4, "precision": "fp32",
                    "measured_s": {"forward": 0.01, "backward": 0.02, "total": 0.03}}],
    }
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(data))
    return data, path


def test_calibration_replaces_constants_and_predicts_layers(tmp_path, capsys):
    data, path = _calibration(tmp_path)
    assert read_calibration(path) == data
    cluster = apply_calibration(load_cluster("h100_2x8"), data)
    assert cluster.gemm_flops("fp32") == pytest.approx(5e10)
    assert cluster.memory_bytes_per_s == pytest.approx(1e10)
    assert cluster.link_bytes_per_s(False) == pytest.approx(1e9)
    assert cluster.link_bytes_per_s(True) == pytest.approx(50e9 * 0.8)  # not measured: unchanged
    # Hand-computed prediction of the layer: the router GEMM reads its input at 1e10 B/s (memory bound), the expert
    # GEMMs run at 5e10 FLOP/s (compute bound), element-wise bytes at 1e10 B/s, and 4 all-to-alls each take
    # 1e-4 s + (3/4 of 512 rows x 256 x 4 bytes) / 1e9 B/s.
    c = cluster_from_calibration(data)
    t, k, h, f = 256, 2, 256, 1024
    router = max(2 * t * h * 4 / 5e10, t * h * 4 / 1e10)
    assert router == t * h * 4 / 1e10
    expert = 2 * (t * k) * 2 * h * f / 5e10
    elementwise = ((1 + k) * h * 2 * t + t * k * 2 * f) * 4 / 1e10
    a2a = 1e-4 + 0.75 * t * k * h * 4 / 1e9
    pred = predict_moe_layer(data["layers"][0], c)
    assert pred["forward"] == pytest.approx(router + elementwise + expert + 2 * a2a, rel=1e-9)
    assert pred["total"] == pytest.approx(3 * (router + elementwise + expert) + 4 * a2a, rel=1e-9)
    (lp,) = layer_predictions(data)
    assert lp.error("total") == pytest.approx(pred["total"] / 0.03 - 1)
    assert main(["simulate", "--calibration", str(path)]) == 0
    assert "measured layers" in capsys.readouterr().out


def test_bad_calibration_files(tmp_path):
    data, path = _calibration(tmp_path)
    for bad, words in (({**data, "format": "v0"}, "format"), ({**data, "extra": 1}, "unknown key"),
                       ({**data, "links": {"intra_node": {"bandwidth_bytes_per_s": 0, "latency_s": 0}}},
                        "bandwidth_bytes_per_s=0")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            read_calibration(path)
