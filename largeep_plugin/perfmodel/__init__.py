"""Performance model of large expert parallelism: training throughput, decode latency and memory of a parallel
layout on a cluster, from the model's shape and the hardware's rates. Pure Python (standard library); pyyaml
reads the files, matplotlib draws the charts, torch only measures the CPU for calibration.

    from largeep_plugin.perfmodel import load_model, load_cluster, parse_layout, TrainingWorkload, simulate_training
    r = simulate_training(load_model("source_model"), load_cluster("h100_2x8"), parse_layout("ep16"),
                          TrainingWorkload(seq_len=10000, global_batch=1024, precision="fp16"))
    print(r.tokens_per_s, r.mfu, r.breakdown, r.memory.describe())

docs/performance_model.md explains the formulas, the assumptions and the validation.
"""
from largeep_plugin.perfmodel.calibrate import apply_calibration, layer_predictions, read_calibration
from largeep_plugin.perfmodel.claims import check_claims
from largeep_plugin.perfmodel.decode import DecodeResult, simulate_decode
from largeep_plugin.perfmodel.imbalance import imbalance_from_load, rank_imbalance
from largeep_plugin.perfmodel.layout import Layout, check_layout, parse_layout
from largeep_plugin.perfmodel.memory import MemoryReport, decode_memory, training_memory
from largeep_plugin.perfmodel.scenario import Scenario, load_scenario
from largeep_plugin.perfmodel.specs import (AttentionSpec, ClusterSpec, EfficiencySpec, GPUSpec, LinkSpec,
                                            ModelSpec, MoESpec, load_cluster, load_model)
from largeep_plugin.perfmodel.training import TrainingResult, simulate_training
from largeep_plugin.perfmodel.validate import run_validation
from largeep_plugin.perfmodel.workload import DecodeWorkload, TrainingWorkload

__all__ = [
    "AttentionSpec", "ClusterSpec", "DecodeResult", "DecodeWorkload", "EfficiencySpec", "GPUSpec", "Layout",
    "LinkSpec", "MemoryReport", "ModelSpec", "MoESpec", "Scenario", "TrainingResult", "TrainingWorkload",
    "apply_calibration", "check_claims", "check_layout", "decode_memory", "imbalance_from_load",
    "layer_predictions", "load_cluster", "load_model", "load_scenario", "parse_layout", "rank_imbalance",
    "read_calibration", "run_validation", "simulate_decode", "simulate_training", "training_memory",
]
