"""Plain-text tables of predictions, claims and validation, as `largeep simulate` prints them."""
from __future__ import annotations

from typing import Sequence

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.claims import ClaimCheck, ratio_verdict
from largeep_plugin.perfmodel.decode import DECODE_KEYS, DecodeResult
from largeep_plugin.perfmodel.specs import ClusterSpec, ModelSpec
from largeep_plugin.perfmodel.training import BREAKDOWN_KEYS, TrainingResult
from largeep_plugin.perfmodel.validate import ValidationRow


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def describe_model(model: ModelSpec, cluster: ClusterSpec, seq_len: int | None = None) -> str:
    moe = model.moe
    experts = (f"{moe.num_experts} experts (top-{moe.top_k}, FFN {moe.ffn_hidden_size}, {moe.activation})"
               if moe else "dense")
    text = (f"model {model.name}: {model.num_layers} layers, H {model.hidden_size}, {experts}; "
            f"{flops.total_params(model) / 1e9:.2f} B parameters, {flops.active_params(model) / 1e9:.2f} B active")
    if seq_len:
        text += f", {flops.training_flops_per_token(model, seq_len) / 1e9:.1f} GFLOP per trained token at S={seq_len}"
    text += (f"\ncluster {cluster.name}: {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name}, "
             f"NVLink {cluster.intra_node.bandwidth_GB_per_s:g} GB/s, inter-node {cluster.inter_node.bandwidth_GB_per_s:g}"
             " GB/s per GPU and direction")
    return text


def training_table(results: Sequence[TrainingResult]) -> str:
    header = ["training", *(r.layout.name for r in results)]
    rows = [
        ["tokens/s", *(f"{r.tokens_per_s:,.0f}" for r in results)],
        ["step (s)", *(f"{r.step_s:.2f}" for r in results)],
        ["TFLOP/s per GPU", *(f"{r.tflops_per_gpu:.0f}" for r in results)],
        ["MFU", *(f"{r.mfu:.1%}" for r in results)],
        ["micro-batches / step", *(str(r.microbatches) for r in results)],
        ["imbalance (max/mean)", *(f"{r.imbalance:.2f}" for r in results)],
    ]
    for key in BREAKDOWN_KEYS:
        if any(r.breakdown[key] for r in results):
            rows.append([f"  {key} (s)", *(f"{r.breakdown[key]:.2f}" for r in results)])
    rows.append(["  all-to-all hidden (s)", *(f"{r.a2a_hidden_s:.2f}" for r in results)])
    rows.append(["memory per GPU (GB)", *(f"{r.memory.total / 1e9:.1f}" for r in results)])
    rows.append(["fits in GPU memory", *(("yes" if r.memory.fits else "NO") for r in results)])
    rows.append(["largest micro-batch", *(str(r.memory.max_batch) for r in results)])
    return table(header, rows)


def decode_table(results: Sequence[DecodeResult]) -> str:
    r0 = results[0]
    header = [f"decode B={r0.batch} S={r0.context}", *(r.layout.name for r in results)]
    rows = [
        ["ms per output token", *(f"{r.tpot_s * 1e3:.3f}" for r in results)],
        ["floor (ms)", *(f"{r.floor_s * 1e3:.3f}" for r in results)],
        ["tokens/s", *(f"{r.tokens_per_s:,.0f}" for r in results)],
    ]
    for key in DECODE_KEYS:
        if any(r.breakdown[key] for r in results):
            rows.append([f"  {key} (ms)", *(f"{r.breakdown[key] * 1e3:.3f}" for r in results)])
    rows.append(["memory per GPU (GB)", *(f"{r.memory.total / 1e9:.1f}" for r in results)])
    rows.append(["fits in GPU memory", *(("yes" if r.memory.fits else "NO") for r in results)])
    rows.append(["largest batch that fits", *(str(r.memory.max_batch) for r in results)])
    return table(header, rows)


def claims_report(checks: Sequence[ClaimCheck]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["", *(c.layout for c in checks)]
    rows = [
        ["claimed training tokens/s", *(num(c.claimed_tokens_per_s, ",.0f") for c in checks)],
        ["predicted tokens/s", *(num(c.predicted_tokens_per_s, ",.0f") for c in checks)],
        ["ceiling at 100% MFU", *(num(c.ceiling_tokens_per_s, ",.0f") for c in checks)],
        ["MFU the claim needs", *(num(c.needed_mfu, ".0%") for c in checks)],
        ["  ... if top-1", *(num(c.needed_mfu_top1, ".0%") for c in checks)],
        ["claimed ms per token", *(num(c.claimed_ms, "g") for c in checks)],
        ["predicted ms, batch 1", *(num(c.predicted_ms_batch1, ".2f") for c in checks)],
        ["floor ms, batch 1", *(num(c.floor_ms_batch1, ".2f") for c in checks)],
    ]
    if checks and checks[0].decode_batch is not None:
        b = checks[0].decode_batch
        rows += [
            [f"predicted ms, batch {b}", *(num(c.predicted_ms, ".2f") for c in checks)],
            [f"batch {b} fits in memory", *(("yes" if c.decode_fits else "NO") for c in checks)],
            ["largest batch that fits", *(num(c.max_decode_batch, "d") for c in checks)],
        ]
    lines = [table(header, rows), "", "verdict:"]
    for c in checks:
        lines += [f"  - {v}" for v in c.verdicts]
    ratio = ratio_verdict(list(checks))
    if ratio:
        lines.append(f"  - {ratio}")
    return "\n".join(lines)


def validation_report(rows: Sequence[ValidationRow], fits: dict[str, float]) -> str:
    body = [[r.case.name, r.case.role, r.case.layout.name, f"{r.case.published_tflops:.0f}",
             f"{r.predicted_tflops:.0f}", f"{r.error:+.0%}",
             "-" if r.case.published_tokens_per_gpu is None else f"{r.case.published_tokens_per_gpu:,.0f}",
             f"{r.result.tokens_per_s / r.case.layout.world:,.0f}"] for r in rows]
    text = table(["case", "role", "layout", "published TFLOP/s", "predicted", "error", "published tok/s/GPU",
                  "predicted tok/s/GPU"], body)
    for name, value in fits.items():
        text += f"\nfitted efficiency.cross_batch_overlap from {name}: {value:.2f}"
    return text
