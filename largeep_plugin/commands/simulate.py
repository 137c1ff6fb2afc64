"""`largeep simulate`: predict training throughput and decode latency of parallel layouts on a cluster.

Examples:
    largeep simulate --preset source                        # the source design's claims against the model
    largeep simulate --model M.yaml --cluster C.yaml --layout ep16 --layout tp8pp2 --seq-len 4096 \\
        --global-batch 512
    largeep simulate --preset source --ep-sweep --plot-dir runs/sim   # PNG charts
    largeep simulate --validate                             # against published Megatron/NeMo numbers
    largeep simulate --calibration runs/perfmodel_calibration.json    # measured layers: predicted vs measured
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from largeep_plugin.perfmodel.calibrate import apply_calibration, layer_predictions, read_calibration
from largeep_plugin.perfmodel.claims import check_claims
from largeep_plugin.perfmodel.decode import simulate_decode
from largeep_plugin.perfmodel.imbalance import imbalance_from_load
from largeep_plugin.perfmodel.layout import Layout, parse_layout
from largeep_plugin.perfmodel.report import (claims_report, decode_table, describe_model, table, training_table,
                                             validation_report)
from largeep_plugin.perfmodel.scenario import Scenario, load_scenario
from largeep_plugin.perfmodel.specs import PRECISIONS, load_cluster, load_model
from largeep_plugin.perfmodel.training import TrainingResult, simulate_training
from largeep_plugin.perfmodel.validate import run_validation
from largeep_plugin.perfmodel.workload import DISPATCH, OVERLAP, RECOMPUTE, DecodeWorkload, TrainingWorkload
from .flags import int_at_least, number

_TRAIN_FLAGS = {"seq_len": "seq_len", "global_batch": "global_batch", "micro_batch": "micro_batch",
                "precision": "precision", "recompute": "recompute", "overlap": "overlap", "chunks": "overlap_chunks",
                "dispatch": "dispatch", "imbalance": "imbalance", "tp_comm_overlap": "tp_comm_overlap"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="predict throughput and latency of parallel layouts (performance model)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to simulate")
    src.add_argument("--preset", metavar="NAME", help="a scenario preset or file with model, cluster, workloads, "
                     "layouts and claimed numbers (e.g. 'source': the source design on 2 x 8 H100)")
    src.add_argument("--model", metavar="FILE", help="model YAML or preset name (e.g. mixtral_8x7b)")
    src.add_argument("--cluster", metavar="FILE", help="cluster YAML or preset name (e.g. h100_2x8)")
    src.add_argument("--nodes", type=int_at_least(1), help="override the cluster's number of nodes")
    src.add_argument("--layout", action="append", metavar="L", help="parallel layout such as ep16, tp8pp2, "
                     "tp2ep8dp2 or tp2pp8ep64dp2vpp4 (dimensions tp pp ep etp dp vpp); repeat or comma-separate "
                     "to compare several")
    src.add_argument("--mode", choices=("train", "decode", "both"), help="training, decode, or both (default: "
                     "whatever workloads the scenario has; training only without a preset unless --batch given)")
    tr = p.add_argument_group("training workload (overrides the preset's)")
    tr.add_argument("--seq-len", type=int_at_least(1), help="tokens per sequence")
    tr.add_argument("--global-batch", type=int_at_least(1), help="sequences per optimizer step")
    tr.add_argument("--micro-batch", type=int_at_least(1),
                    help="sequences per micro-batch and attention data-parallel rank")
    tr.add_argument("--precision", choices=PRECISIONS, help="GEMM precision (fp8 = FP8 GEMMs and FP8 dispatch)")
    tr.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation")
    tr.add_argument("--overlap", choices=OVERLAP, help="all-to-all overlap: none, chunked (this plugin's "
                    "in-layer pipeline), cross_batch (DualPipe / 1F1B A2A style)")
    tr.add_argument("--chunks", type=int_at_least(2), help="token chunks of the chunked overlap (>= 2)")
    tr.add_argument("--dispatch", choices=DISPATCH, help="flat all-to-all or hierarchical (node-batched, "
                    "deduplicated) dispatch")
    tr.add_argument("--imbalance", type=number(1.0), help="tokens on the busiest EP rank over the mean (>= 1)")
    tr.add_argument("--load", metavar="FILE", help="JSON tokens per expert (list, or {\"tokens_per_expert\": ...}); "
                    "sets the imbalance per layout from its EP size")
    tr.add_argument("--tp-comm-overlap", type=number(0.0), help="fraction of TP collectives hidden under GEMMs (0-1)")
    de = p.add_argument_group("decode workload (overrides the preset's)")
    de.add_argument("--batch", type=int_at_least(1), help="sequences decoded together")
    de.add_argument("--context", type=int_at_least(0), help="cached tokens each new token attends to")
    de.add_argument("--kv-precision", choices=PRECISIONS, help="KV-cache precision")
    out = p.add_argument_group("calibration, validation and output")
    out.add_argument("--calibration", metavar="FILE", help="calibration JSON (largeep-calibration/1): measured "
                     "rates replace the cluster's assumed ones; its measured layers are predicted and compared")
    out.add_argument("--validate", action="store_true", help="compare with published training numbers "
                     "(presets/validation.yaml) and print the table")
    out.add_argument("--ep-sweep", action="store_true", help="also predict ep1..epN (N = GPUs, experts "
                     "replicated with dp) and plot tokens/s against EP size")
    out.add_argument("--plot-dir", metavar="DIR", help="write PNG charts here (breakdown bars; EP sweep)")
    out.add_argument("--json", metavar="FILE", help="write all predictions as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # bad files, layouts or numbers: say what is wrong, no traceback
        print(f"largeep simulate: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {}
    did = False
    if args.validate:
        rows, fits = run_validation()
        print("validation against published numbers (TFLOP/s per GPU by the publisher's FLOP count):")
        print(validation_report(rows, fits))
        report["validation"] = [{"case": r.case.name, "role": r.case.role, "published": r.case.published_tflops,
                                 "predicted": r.predicted_tflops, "error": r.error} for r in rows]
        did = True
    if args.calibration:
        calib = read_calibration(args.calibration)
        preds = layer_predictions(calib)
        if preds:
            print(f"measured layers of {args.calibration}, predicted from its own constants:")
            print(table(["layer", "part", "predicted ms", "measured ms", "error"],
                        [[lp.name, k, f"{lp.predicted_s[k] * 1e3:.2f}", f"{lp.measured_s[k] * 1e3:.2f}",
                          f"{lp.error(k):+.1%}"] for lp in preds for k in lp.measured_s]))
            report["calibration_layers"] = [dataclasses.asdict(lp) for lp in preds]
            did = True
    if args.preset or args.model:
        sc = _scenario(args)
        print(describe_model(sc.model, sc.cluster, sc.training.seq_len if sc.training else None))
        report.update(_simulate(sc, args))
        did = True
    if not did:
        raise ValueError("give --preset, --model/--cluster/--layout, --validate or --calibration "
                         "(see --help)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _scenario(args: argparse.Namespace) -> Scenario:
    """The preset (or an empty scenario from --model/--cluster) with the command line's overrides applied."""
    if args.preset:
        sc = load_scenario(args.preset)
        model = load_model(args.model) if args.model else sc.model
        cluster = load_cluster(args.cluster, nodes=args.nodes) if args.cluster else sc.cluster
        if args.nodes and not args.cluster:
            cluster = dataclasses.replace(cluster, nodes=args.nodes)
    else:
        if not args.cluster or not args.layout:
            raise ValueError("--model needs --cluster and at least one --layout")
        sc = None
        model, cluster = load_model(args.model), load_cluster(args.cluster, nodes=args.nodes)
    if args.calibration:
        cluster = apply_calibration(cluster, read_calibration(args.calibration))
    layouts = tuple(parse_layout(x) for arg in args.layout for x in arg.split(",")) if args.layout else sc.layouts
    training = _training(args, sc.training if sc else None)
    decode = _decode(args, sc.decode if sc else None, training)
    if args.mode == "train":
        decode = None
    elif args.mode == "decode":
        training = None
        if decode is None:
            raise ValueError("--mode decode needs --batch and --context (or a preset with them)")
    return Scenario(name=sc.name if sc else model.name, description=sc.description if sc else "", model=model,
                    cluster=cluster, training=training, decode=decode, layouts=layouts,
                    claims=sc.claims if sc else {})


def _training(args: argparse.Namespace, base: TrainingWorkload | None) -> TrainingWorkload | None:
    changes = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if base is None:
        if args.seq_len is None or args.global_batch is None:
            if args.mode in (None, "train", "both") and not (args.batch and args.context is not None):
                raise ValueError("training needs --seq-len and --global-batch (or a preset)")
            return None
        return TrainingWorkload(**changes)
    if changes.get("overlap") == "chunked" and "overlap_chunks" not in changes and base.overlap_chunks < 2:
        changes["overlap_chunks"] = 4
    return dataclasses.replace(base, **changes)


def _decode(args: argparse.Namespace, base: DecodeWorkload | None,
            training: TrainingWorkload | None) -> DecodeWorkload | None:
    changes = {k: v for k, v in (("batch", args.batch), ("context", args.context),
                                 ("kv_precision", args.kv_precision)) if v is not None}
    if args.precision is not None:
        changes["precision"] = args.precision
    if base is None:
        if "batch" not in changes or "context" not in changes:
            return None
        return DecodeWorkload(**changes)
    return dataclasses.replace(base, **changes)


def _with_load(sc: Scenario, layout: Layout, args: argparse.Namespace, work: TrainingWorkload) -> TrainingWorkload:
    if not args.load or sc.model.moe is None or layout.ep == 1:
        return work
    return dataclasses.replace(work, imbalance=imbalance_from_load(args.load, sc.model.moe.num_experts, layout.ep))


def _simulate(sc: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    results: list[TrainingResult] = []
    if sc.claims:
        per_layout = (lambda l: _with_load(sc, l, args, sc.training)) if sc.training is not None else None
        checks = check_claims(sc, per_layout)
        results = [c.training for c in checks if c.training is not None]
        decodes = [c.decode for c in checks if c.decode is not None]
    else:
        if sc.training is not None:
            results = [simulate_training(sc.model, sc.cluster, l, _with_load(sc, l, args, sc.training))
                       for l in sc.layouts]
        decodes = [simulate_decode(sc.model, sc.cluster, l, sc.decode) for l in sc.layouts] if sc.decode else []
        checks = []
    if results:
        w = sc.training
        print(f"\ntraining: {w.global_batch} sequences x {w.seq_len} tokens per step, {w.precision}, recompute "
              f"{w.recompute}, overlap {w.overlap}, dispatch {w.dispatch}")
        print(training_table(results))
        out["training"] = [dataclasses.asdict(r) for r in results]
    if decodes:
        print()
        print(decode_table(decodes))
        out["decode"] = [dataclasses.asdict(r) for r in decodes]
    if checks:
        print("\nclaims against the model and the physical floors:")
        print(claims_report(checks))
        out["claims"] = [{k: v for k, v in dataclasses.asdict(c).items() if k not in ("training", "decode")}
                         for c in checks]
    sweep: list[TrainingResult] = []
    if args.ep_sweep and sc.training is not None and sc.model.moe is not None:
        sweep = [simulate_training(sc.model, sc.cluster, l, _with_load(sc, l, args, sc.training))
                 for l in _ep_sweep_layouts(sc)]
        print("\nEP sweep (experts replicated with dp when EP < GPUs):")
        print(table(["layout", "tokens/s", "MFU", "fits"], [[r.layout.name, f"{r.tokens_per_s:,.0f}",
                                                             f"{r.mfu:.1%}", "yes" if r.memory.fits else "NO"]
                                                            for r in sweep]))
        out["ep_sweep"] = [{"layout": r.layout.name, "tokens_per_s": r.tokens_per_s, "mfu": r.mfu,
                            "fits": r.memory.fits} for r in sweep]
    if args.plot_dir and results:
        from largeep_plugin.perfmodel.plots import plot_breakdown, plot_ep_sweep
        d = Path(args.plot_dir)
        d.mkdir(parents=True, exist_ok=True)
        paths = [plot_breakdown(results, d / f"{sc.name}_breakdown.png", f"{sc.name}: time per training step")]
        if sweep:
            paths.append(plot_ep_sweep(sweep, d / f"{sc.name}_ep_sweep.png", f"{sc.name}: tokens/s against EP"))
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return out


def _ep_sweep_layouts(sc: Scenario) -> list[Layout]:
    """ep = 1, 2, 4, ... up to the GPU count, each with dp = GPUs / ep, keeping those the model allows."""
    n, e = sc.cluster.num_gpus, sc.model.moe.num_experts
    out = []
    for k in range(int(math.log2(n)) + 1):
        ep = 2 ** k
        if n % ep or (e % ep and ep % e):
            continue
        out.append(Layout(ep=ep, dp=n // ep))
    return out
