"""Performance model formulas against values computed by hand, layout parsing, and clear errors.

Every expected number below is written out from the model's shape (the arithmetic is in the test), not copied
from the code's output.
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.decode import simulate_decode
from largeep_plugin.perfmodel.imbalance import imbalance_from_load, rank_imbalance
from largeep_plugin.perfmodel.layout import Layout, check_layout, group_geometry, parse_layout
from largeep_plugin.perfmodel.memory import decode_memory, training_memory
from largeep_plugin.perfmodel.specs import (ClusterSpec, EfficiencySpec, LinkSpec, from_mapping, load_cluster,
                                            load_model)
from largeep_plugin.perfmodel.workload import DecodeWorkload, TrainingWorkload

H, F = 8192, 32768  # the source design: 4 layers, 16 experts, 16 heads x 512, GELU experts, top-2 (preset)


@pytest.fixture(scope="module")
def source():
    return load_model("source_model")


@pytest.fixture(scope="module")
def h100():
    return load_cluster("h100_2x8")


def test_source_parameters_and_flops(source):
    attn = 4 * H * (16 * 512)            # Q, K, V, O, each H x 8192
    expert = 2 * H * F                   # fc1 and fc2
    router = H * 16
    assert flops.attention_params(source) == attn == 268_435_456
    assert flops.expert_params(source) == expert == 536_870_912
    assert flops.total_params(source) == 4 * (attn + 16 * expert + router) == 35_434_004_480
    assert flops.active_params(source) == 4 * (attn + 2 * expert + router)
    # Causal sequence of 10000: 5000 keys on average; QK^T and AV cost 2 * keys * heads * (2 * 512) per token.
    core = 2 * 5000 * 16 * (2 * 512)
    fwd = 2 * 4 * (attn + 2 * expert + router) + 4 * core
    assert flops.training_flops_per_token(source, 10000) == pytest.approx(3 * fwd, rel=1e-12)
    assert 3 * fwd == 34_181_480_448
    # Counting full S x S attention (as Megatron-Core 0.9 did) doubles the core term only.
    assert flops.training_flops_per_token(source, 10000, causal=False) == pytest.approx(3 * (fwd + 4 * core))


def test_published_model_sizes():
    mixtral = load_model("mixtral_8x7b")
    per_layer = (4096 * 4096 * 2 + 2 * 4096 * 1024) + 8 * 3 * 4096 * 14336 + 4096 * 8
    assert flops.total_params(mixtral) == 32 * per_layer + 2 * 32000 * 4096
    assert flops.total_params(mixtral) == pytest.approx(46.7e9, rel=1e-3)   # Mistral's published 46.7B
    # Mistral's 12.9B active counts both embedding matrices.
    assert flops.active_params(mixtral) + 32000 * 4096 == pytest.approx(12.9e9, rel=5e-3)
    ds = load_model("deepseek_v3")
    assert flops.total_params(ds) == pytest.approx(671e9, rel=5e-3)          # DeepSeek's 671B without MTP
    assert flops.active_params(ds) + 129280 * 7168 == pytest.approx(37e9, rel=2e-2)


def test_kv_cache_bytes():
    assert flops.kv_cache_bytes_per_token(load_model("source_model"), "fp16") == 4 * 2 * 16 * 512 * 2
    assert flops.kv_cache_bytes_per_token(load_model("mixtral_8x7b"), "bf16") == 32 * 2 * 8 * 128 * 2
    # MLA caches the 512-wide latent and the 64-wide shared RoPE key per layer.
    assert flops.kv_cache_bytes_per_token(load_model("deepseek_v3"), "bf16") == 61 * (512 + 64) * 2


def test_all_to_all_bytes_per_token(source):
    assert flops.dispatch_bytes_per_token(source, "fp16") == 2 * H * 2
    assert flops.dispatch_bytes_per_token(load_model("deepseek_v3"), "fp8") == 8 * 7168 * 1
    # EP 16 over 2 nodes of 8: a copy stays on its GPU 1/16, crosses NVLink 7/16, crosses nodes 8/16.
    per_node, nodes = group_geometry(16, 1, 8)
    assert (per_node, nodes) == (8, 2)
    assert flops.remote_copy_fractions(16, per_node) == (7 / 16, 8 / 16)
    # Node-batched: top-2 over 2 nodes touches 2 * (1 - 1/4) = 1.5 nodes, of which half are the other node.
    assert flops.distinct_remote_nodes(2, 2) == pytest.approx(0.75)
    # DeepSeek-V3: top-8 over 8 nodes, at most 4 nodes per token.
    assert flops.distinct_remote_nodes(8, 8, 4) == pytest.approx(4 * (1 - 0.75 ** 8) * 7 / 8)
    assert flops.distinct_remote_nodes(8, 1) == 0.0


@pytest.mark.parametrize("text, dims, world, attn_dp", [
    ("ep16", dict(ep=16), 16, 16),
    ("tp8pp2", dict(tp=8, pp=2, etp=8), 16, 1),
    ("tp2ep8", dict(tp=2, ep=8), 8, 4),
    ("ep16dp2", dict(ep=16, dp=2), 32, 32),
    ("TP2-PP8-EP64-DP2-VPP4", dict(tp=2, pp=8, ep=64, dp=2, vpp=4), 1024, 64),
    ("tp2ep8etp2", dict(tp=2, ep=8, etp=2), 16, 8),
])
def test_parse_layout(text, dims, world, attn_dp):
    layout = parse_layout(text)
    assert layout == Layout(**dims)
    assert (layout.world, layout.attn_dp) == (world, attn_dp)
    assert parse_layout(layout.name) == layout


@pytest.mark.parametrize("text, words", [
    ("", "non-empty"), ("ep0", ">= 1"), ("xx4", "cannot read"), ("tp2tp4", "twice"), ("ep16foo", "cannot read"),
    ("tp3ep2", "must divide"),
])
def test_parse_layout_errors(text, words):
    with pytest.raises(ValueError, match=words):
        parse_layout(text)


def test_impossible_layouts_are_clear_errors(source, h100):
    with pytest.raises(ValueError, match="needs 32 GPUs.*has 16"):
        check_layout(parse_layout("ep32"), source, h100)
    twelve_heads = dataclasses.replace(source, attention=dataclasses.replace(source.attention, num_heads=12))
    with pytest.raises(ValueError, match="num_heads=12 is not divisible by tp=8"):
        check_layout(parse_layout("tp8pp2"), twelve_heads, h100)
    with pytest.raises(ValueError, match="num_experts=16 must divide"):
        check_layout(parse_layout("ep3"), source, dataclasses.replace(h100, nodes=1, gpus_per_node=3))
    with pytest.raises(ValueError, match="global_batch=1000 must be a multiple"):
        from largeep_plugin.perfmodel.training import simulate_training
        simulate_training(source, h100, parse_layout("ep16"), TrainingWorkload(seq_len=100, global_batch=1000))


@pytest.mark.parametrize("bad, words", [
    (dict(inter_node={"bandwidth_GB_per_s": 0, "latency_us": 5}), "cluster.inter_node: bandwidth_GB_per_s=0"),
    (dict(efficiency={"memory": 1.5}), "efficiency.memory=1.5 must be a fraction"),
    (dict(nodes=0), "cluster.nodes=0 must be >= 1"),
    (dict(colour="red"), "unknown key"),
    (dict(gpu={"name": "x", "peak_TFLOPs": {"fp7": 1}, "hbm_TB_per_s": 1, "memory_GB": 1}), "fp7"),
])
def test_bad_cluster_files_name_the_field(bad, words):
    good = {"name": "c", "nodes": 1, "gpus_per_node": 8,
            "gpu": {"name": "g", "peak_TFLOPs": {"bf16": 989}, "hbm_TB_per_s": 3.35, "memory_GB": 80},
            "intra_node": {"bandwidth_GB_per_s": 450, "latency_us": 10},
            "inter_node": {"bandwidth_GB_per_s": 50, "latency_us": 20}}
    from_mapping(ClusterSpec, good, "cluster.")
    with pytest.raises(ValueError, match=words):
        from_mapping(ClusterSpec, {**good, **bad}, "cluster.")
    with pytest.raises(ValueError, match="bandwidth_GB_per_s=0"):
        LinkSpec(bandwidth_GB_per_s=0, latency_us=1)
    with pytest.raises(ValueError, match="cross_batch_overlap"):
        EfficiencySpec(cross_batch_overlap=2.0)


def test_bad_workloads():
    with pytest.raises(ValueError, match="training.imbalance=0.5"):
        TrainingWorkload(seq_len=1, global_batch=1, imbalance=0.5)
    with pytest.raises(ValueError, match="overlap_chunks >= 2"):
        TrainingWorkload(seq_len=1, global_batch=1, overlap="chunked")
    with pytest.raises(ValueError, match="decode.precision='int3'"):
        DecodeWorkload(batch=1, context=1, precision="int3")


def test_rank_imbalance_and_load_files(tmp_path):
    assert rank_imbalance([10, 10, 10, 10], 2) == 1.0
    assert rank_imbalance([30, 10, 10, 10], 2) == pytest.approx(40 / 30)       # ranks hold 40 and 20
    assert rank_imbalance([30, 10], 4) == pytest.approx(15 / 10)               # 2 replicas each: 15 15 5 5
    path = tmp_path / "load.json"
    path.write_text('{"tokens_per_expert": [[30, 10, 10, 10], [10, 10, 10, 10]]}')
    assert imbalance_from_load(path, 4, 2) == pytest.approx((40 / 30 + 1.0) / 2)
    with pytest.raises(ValueError, match="num_experts=8"):
        imbalance_from_load(path, 8, 2)
    with pytest.raises(ValueError, match="sums to 0"):
        rank_imbalance([0, 0], 2)


def test_memory_by_hand(source, h100):
    w = TrainingWorkload(seq_len=10000, global_batch=1024, precision="fp16")
    mem = training_memory(source, h100, parse_layout("ep16"), w)
    params = 4 * (4 * H * 8192 + 16 * 8192 + 2 * H * F)  # 4 layers: attention, router, one expert
    assert mem.weights == 2 * params
    assert mem.gradients == 4 * params
    # Attention and router optimizer state is sharded over the 16 data-parallel ranks; the expert's is not.
    assert mem.optimizer == pytest.approx(12 * (4 * (4 * H * 8192 + 16 * 8192) / 16 + 4 * 2 * H * F))
    # Decode at the source's batch: 1024 sequences over 16 attention ranks, 10000 tokens x 4 layers x 32 KB.
    d = decode_memory(source, h100, parse_layout("ep16"), DecodeWorkload(batch=1024, context=10000,
                                                                          precision="fp16"))
    assert d.kv_cache == 64 * 10000 * 4 * (2 * 16 * 512 * 2)
    assert not d.fits
    room = 80e9 - 4e9 - 2 * params
    assert d.max_batch == math.floor(room / (10000 * 4 * 2 * 16 * 512 * 2)) * 16


def test_decode_floor_by_hand(source, h100):
    r = simulate_decode(source, h100, parse_layout("ep16"), DecodeWorkload(batch=1, context=10000,
                                                                            precision="fp16"))
    # Batch 1: one GPU streams a layer's attention weights, its KV cache and one whole expert (+ the router).
    per_layer = 2 * 4 * H * 8192 + 10000 * 2 * 16 * 512 * 2 + 2 * 2 * H * F + 2 * H * 16
    assert r.floor_s == pytest.approx(4 * per_layer / 3.35e12, rel=1e-6)
    assert r.tpot_s > r.floor_s
