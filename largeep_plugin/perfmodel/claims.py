"""Claimed numbers against the prediction and against physical floors, with a plain verdict per claim.

Training: the ceiling is every GPU at its dense peak doing nothing but the model's FLOPs (MFU 1). A claim is
  impossible above it, cannot hold above the GEMM efficiency (no training step runs faster than its GEMMs do
  alone), and is otherwise compared with the prediction (within 30% = consistent).
Decode: a claim cannot hold below the floor of batch 1 (peak HBM bandwidth streaming the weights and KV cache
  one token needs, no communication), and a batch whose weights and KV cache exceed GPU memory cannot run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from largeep_plugin.perfmodel import flops
from largeep_plugin.perfmodel.decode import DecodeResult, simulate_decode
from largeep_plugin.perfmodel.layout import Layout
from largeep_plugin.perfmodel.scenario import Scenario
from largeep_plugin.perfmodel.training import TrainingResult, simulate_training
from largeep_plugin.perfmodel.workload import TrainingWorkload

TOLERANCE = 1.3


@dataclass(frozen=True, kw_only=True)
class ClaimCheck:
    """One layout's claims beside the model. Training figures are tokens/s; decode figures ms per token."""

    layout: str
    claimed_tokens_per_s: float | None
    predicted_tokens_per_s: float | None
    ceiling_tokens_per_s: float | None
    needed_mfu: float | None
    needed_mfu_top1: float | None
    claimed_ms: float | None
    predicted_ms: float | None
    floor_ms: float | None
    decode_batch: int | None
    decode_fits: bool | None
    max_decode_batch: int | None
    predicted_ms_batch1: float | None
    floor_ms_batch1: float | None
    training: TrainingResult | None
    decode: DecodeResult | None
    verdicts: tuple[str, ...]


def check_claims(sc: Scenario,
                 workload_for: Callable[[Layout], TrainingWorkload] | None = None) -> list[ClaimCheck]:
    """Predict every layout of the scenario and judge its claims (layouts without claims are predicted too).
    workload_for: the training workload per layout (e.g. with an imbalance measured at its EP size); default:
    the scenario's."""
    out = []
    top1 = None
    if sc.model.moe is not None and sc.model.moe.top_k > 1:
        top1 = dataclasses.replace(sc.model, moe=dataclasses.replace(sc.model.moe, top_k=1))
    for layout in sc.layouts:
        claim = sc.claims.get(layout.name)
        verdicts: list[str] = []
        tr = pred_tps = ceiling = need = need1 = None
        if sc.training is not None:
            w = workload_for(layout) if workload_for else sc.training
            tr = simulate_training(sc.model, sc.cluster, layout, w)
            pred_tps = tr.tokens_per_s
            peak = sc.cluster.num_gpus * sc.cluster.gpu.peak_flops(w.precision)
            ceiling = peak / tr.flops_per_token
            if claim is not None and claim.tokens_per_s is not None:
                need = claim.tokens_per_s * tr.flops_per_token / peak
                if top1 is not None:
                    need1 = claim.tokens_per_s * flops.training_flops_per_token(top1, w.seq_len) / peak
                verdicts.append(_training_verdict(layout.name, claim.tokens_per_s, tr, need, need1,
                                                  sc.cluster.efficiency.gemm_fraction(w.precision)))
            if not tr.memory.fits:
                verdicts.append(f"{layout.name} training: {tr.memory.describe()}")
        dr = dr1 = None
        if sc.decode is not None:
            d = sc.decode
            dr = simulate_decode(sc.model, sc.cluster, layout, d)
            dr1 = simulate_decode(sc.model, sc.cluster, layout, dataclasses.replace(d, batch=1))
            drm = None
            if not dr.memory.fits and dr.memory.max_batch >= 1:
                drm = simulate_decode(sc.model, sc.cluster, layout,
                                      dataclasses.replace(d, batch=dr.memory.max_batch))
            if claim is not None and claim.ms_per_token is not None:
                verdicts.append(_decode_verdict(layout.name, claim.ms_per_token, dr, dr1, drm))
        out.append(ClaimCheck(
            layout=layout.name,
            claimed_tokens_per_s=claim.tokens_per_s if claim else None,
            predicted_tokens_per_s=pred_tps, ceiling_tokens_per_s=ceiling, needed_mfu=need, needed_mfu_top1=need1,
            claimed_ms=claim.ms_per_token if claim else None,
            predicted_ms=dr.tpot_s * 1e3 if dr else None, floor_ms=dr.floor_s * 1e3 if dr else None,
            decode_batch=dr.batch if dr else None, decode_fits=dr.memory.fits if dr else None,
            max_decode_batch=dr.memory.max_batch if dr else None,
            predicted_ms_batch1=dr1.tpot_s * 1e3 if dr1 else None, floor_ms_batch1=dr1.floor_s * 1e3 if dr1 else None,
            training=tr, decode=dr, verdicts=tuple(verdicts)))
    return out


def ratio_verdict(checks: list[ClaimCheck]) -> str | None:
    """Compare the claimed training speed-up of the first layout over the second with the predicted one."""
    if len(checks) < 2:
        return None
    a, b = checks[0], checks[1]
    if not (a.claimed_tokens_per_s and b.claimed_tokens_per_s and a.predicted_tokens_per_s
            and b.predicted_tokens_per_s):
        return None
    claimed = a.claimed_tokens_per_s / b.claimed_tokens_per_s
    predicted = a.predicted_tokens_per_s / b.predicted_tokens_per_s
    return (f"speed-up {a.layout} over {b.layout}: claimed {claimed:.2f}x, predicted {predicted:.2f}x "
            f"({'consistent' if abs(claimed / predicted - 1) < TOLERANCE - 1 else 'not supported by the model'})")


def _training_verdict(name: str, claimed: float, tr: TrainingResult, need: float, need1: float | None,
                      gemm_eff: float) -> str:
    top1 = f" (top-1, the most favourable reading: {need1:.0%})" if need1 is not None else ""
    head = f"{name} training {claimed:,.0f} tokens/s needs MFU {need:.0%}{top1}"
    if need > 1.0:
        return f"{head}: IMPOSSIBLE, above the GPUs' peak FLOP rate."
    if need > gemm_eff:
        return (f"{head}: CANNOT HOLD, faster than the GEMMs alone run ({gemm_eff:.0%} of peak); the model "
                f"predicts {tr.tokens_per_s:,.0f} tokens/s (MFU {tr.mfu:.0%}).")
    ratio = claimed / tr.tokens_per_s
    if ratio > TOLERANCE:
        return f"{head}: OPTIMISTIC, {ratio:.2f}x the prediction of {tr.tokens_per_s:,.0f} tokens/s."
    if ratio < 1 / TOLERANCE:
        return (f"{head}: PESSIMISTIC, the model predicts {tr.tokens_per_s:,.0f} tokens/s ({1 / ratio:.2f}x more); "
                "nothing in the hardware forces it that low.")
    return f"{head}: consistent with the prediction of {tr.tokens_per_s:,.0f} tokens/s (within 30%)."


def _decode_verdict(name: str, claimed_ms: float, dr: DecodeResult, dr1: DecodeResult,
                    drm: DecodeResult | None) -> str:
    head = f"{name} decode {claimed_ms:g} ms/token"
    parts = []
    if not dr.memory.fits:
        parts.append(f"at batch {dr.batch} x context {dr.context} it CANNOT RUN ({dr.memory.describe()})")
        if drm is not None:
            parts.append(f"the largest batch that fits, {drm.batch}, takes {drm.tpot_s * 1e3:.2f} ms "
                         f"(floor {drm.floor_s * 1e3:.2f} ms)")
    floor1, pred1 = dr1.floor_s * 1e3, dr1.tpot_s * 1e3
    if claimed_ms < floor1:
        parts.append(f"CANNOT HOLD at context {dr.context}: below the floor of {floor1:.2f} ms even at batch 1 "
                     f"(weights and KV cache streamed at peak HBM bandwidth, no communication)")
    elif claimed_ms > TOLERANCE * pred1:
        parts.append(f"at batch 1 the model predicts {pred1:.2f} ms (floor {floor1:.2f} ms), "
                     f"so the claim is {claimed_ms / pred1:.1f}x slower than the model")
    else:
        parts.append(f"at batch 1 the model predicts {pred1:.2f} ms (floor {floor1:.2f} ms)")
    if dr.memory.fits:
        parts.append(f"at batch {dr.batch} it predicts {dr.tpot_s * 1e3:.2f} ms")
    return f"{head}: " + "; ".join(parts) + "."
