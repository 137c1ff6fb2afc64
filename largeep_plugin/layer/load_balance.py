"""Load counting, the balancing bias, the balancing losses, and the per-step load monitor.

Shape legend:
    T  tokens on this rank      E  experts      K  top_k

Two ways to balance, usable together:
* aux-loss-free: an additive per-expert bias used only for *selection*; after each optimizer step it moves by
  ``rate * sign(mean - count)`` from the *global* counts, so every rank applies the same update.
* a switch-style auxiliary loss ``coeff * E * sum_e f_e * P_e`` (f_e: global fraction of assignments to e, no
  gradient; P_e: mean score of e on this rank's tokens), and a z-loss ``coeff * mean(logsumexp(logits)^2)``.
  Because f is global, the mean of the per-rank losses over ranks with equal token counts equals the loss of the
  whole batch, so data-parallel gradient averaging gives the full-batch gradient.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LoadStats:
    """Load of one MoE layer in one forward, summed over the EP group. Tensors stay on the device; reading a
    property syncs with the host.

    Attributes:
        tokens_per_expert_E: int64 assignments per expert over the EP group (before capacity drops).
        dropped: int64 0-d, assignments dropped by capacity over the EP group.
        aux_loss: float32 0-d, this rank's switch loss (already multiplied by its coefficient; 0 when off).
        z_loss: float32 0-d, this rank's z-loss (already multiplied by its coefficient; 0 when off).
        rows_per_rank_R: int64 [R] rows each rank of the EP group computed (kept assignments received, replicas
            and clones included), or None where the layer does not count them.
    """

    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    rows_per_rank_R: torch.Tensor | None = None

    @property
    def imbalance(self) -> float:
        """max / mean of the tokens per expert (1.0 = perfectly balanced)."""
        return imbalance(self.tokens_per_expert_E)

    @property
    def rank_imbalance(self) -> float | None:
        """max / mean of the rows per rank: what the step waits for (None when not counted)."""
        return None if self.rows_per_rank_R is None else imbalance(self.rows_per_rank_R)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "counts": [int(c) for c in self.tokens_per_expert_E.tolist()],
            "imbalance": self.imbalance,
            "drops": int(self.dropped),
            "aux_loss": float(self.aux_loss),
            "z_loss": float(self.z_loss),
        }
        if self.rows_per_rank_R is not None:
            out["rows_per_rank"] = [int(c) for c in self.rows_per_rank_R.tolist()]
            out["rank_imbalance"] = self.rank_imbalance
        return out


def imbalance(tokens_per_expert_E: torch.Tensor) -> float:
    """max / mean of a load vector; 1.0 for an all-zero vector (nothing routed is not imbalanced)."""
    counts = tokens_per_expert_E.double()
    mean = counts.mean()
    if float(mean) == 0.0:
        return 1.0
    return float(counts.max() / mean)


def switch_aux_loss(
    scores_TE: torch.Tensor, global_tokens_per_expert_E: torch.Tensor, top_k: int, score_function: str
) -> torch.Tensor:
    """Switch-transformer load-balancing loss with global assignment fractions (coefficient not applied).

    For sigmoid scores the per-token scores are normalised to sum to one first, as Megatron does.
    Returns 0 for an empty batch.
    """
    num_experts = scores_TE.shape[-1]
    if scores_TE.shape[0] == 0:
        return scores_TE.sum() * 0.0
    probs_TE = scores_TE
    if score_function == "sigmoid":
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    total = global_tokens_per_expert_E.sum().clamp(min=1).double()
    f_E = (global_tokens_per_expert_E.double() / total).float()
    p_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * p_E).sum()


def sequence_aux_loss(
    scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, sequence_T: torch.Tensor, num_sequences: int,
    score_function: str,
) -> torch.Tensor:
    """Sequence-wise balancing loss (DeepSeek-V3; Megatron ``seq_aux_loss``), coefficient not applied.

    The switch loss of each sequence on its own, averaged over the sequences:
        mean_n  E * sum_e f_ne * P_ne,   f_ne = (assignments of sequence n to e) / (K * tokens of n),
                                         P_ne = mean over the tokens of n of their (normalised) score of e.
    Which token belongs to which sequence is the caller's: ``sequence_T`` [T] int64 in [0, N). For a
    ``[B, S, H]`` input (the core layer) token t = b * S + s is in sequence t // S; for Megatron's ``[S, B, H]``
    token t = s * B + b is in sequence t % B. Sequences live on one rank (the layer's counts are local: no
    collective); over data-parallel copies every rank averages its own sequences, and averaging the gradients
    averages over all sequences. Sigmoid scores are normalised to sum to one per token first (as in the switch
    loss). Counts are of the chosen experts (after bias and groups, before capacity drops). Returns 0 for T = 0.
    """
    t, e = scores_TE.shape
    k = topk_ids_TK.shape[1]
    if t == 0:
        return scores_TE.sum() * 0.0
    probs_TE = scores_TE
    if score_function == "sigmoid":
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    # Step 1: assignments and tokens per sequence, by scatter-add on the device.
    flat_NE = (sequence_T.unsqueeze(1) * e + topk_ids_TK).reshape(-1)
    counts_NE = torch.zeros(num_sequences * e, dtype=probs_TE.dtype, device=probs_TE.device).scatter_add_(
        0, flat_NE, torch.ones_like(flat_NE, dtype=probs_TE.dtype)).view(num_sequences, e)
    tokens_N = torch.zeros(num_sequences, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(
        0, sequence_T, torch.ones(t, dtype=probs_TE.dtype, device=probs_TE.device)).clamp(min=1)
    # Step 2: the fractions f (no gradient) and the mean scores P of each sequence.
    f_NE = counts_NE / (k * tokens_N.unsqueeze(1))
    p_NE = torch.zeros(num_sequences, e, dtype=probs_TE.dtype, device=probs_TE.device).index_add(
        0, sequence_T, probs_TE) / tokens_N.unsqueeze(1)
    # Step 3: the switch loss of each sequence, averaged.
    return (e * (f_NE * p_NE).sum(dim=-1)).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (coefficient not applied)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
    """Move the selection bias towards balance, in place: ``bias += rate * sign(mean - count)``.

    Call it after the optimizer step with *global* counts (identical on every rank) so that the biases of all
    ranks stay identical. Underloaded experts get a larger bias, overloaded ones a smaller one.
    """
    counts = tokens_per_expert_E.to(torch.float32)
    expert_bias_E.add_(rate * torch.sign(counts.mean() - counts))


@torch.no_grad()
def apply_bias_updates(
    expert_biases: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], rates: Sequence[float],
    group: Any = None,
) -> int:
    """The one aux-loss-free bias step of a model, for every path (core layer, Megatron, DeepSpeed).

    Args:
        expert_biases: [L] the layers' selection biases, float32 [E] each, updated in place.
        counts: [L] the layers' assignments per expert since the last update, [E] each (summed over the EP group
            already); zeroed after the update.
        rates: [L] each layer's ``bias_update_rate``.
        group: the counts are first summed over it (one all_reduce for all layers), so that every data-parallel
            copy of the model applies the same update; None or a group of one: no collective.
    Returns:
        the number of layers updated.
    """
    if not expert_biases:
        return 0
    counts_LE = torch.stack([c.to(torch.float64) for c in counts])  # float64: exact for any realistic count
    if group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_LE, group=group)
    for bias_E, counts_E, rate, source in zip(expert_biases, counts_LE, rates, counts):
        update_expert_bias(bias_E, counts_E, rate)
        source.zero_()
    return len(expert_biases)


class LoadMonitor:
    """Appends one JSON line per step and layer to ``path``:
    ``{"step", "layer", "counts", "imbalance", "drops", "aux_loss", "z_loss", "rows_per_rank", "rank_imbalance"}``
    (the last two where the layer counts them), and one per re-plan of dynamic replicas (``log_replans``):
    ``{"step", "layer", "replan": {"changed", "clones", "moved", "refresh_bytes_per_step",
    "predicted_rank_imbalance", ...}}``; the measured rank imbalance of the steps after it is in the records above.

    Write from one rank only (counts are global already). Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, layer: str, stats: LoadStats) -> dict[str, Any]:
        record = {"step": int(step), "layer": str(layer), **stats.as_dict()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def log_model(self, step: int, layers: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Log every (name, layer) that has ``last_stats``; returns the records written."""
        return [self.log(step, name, layer.last_stats) for name, layer in layers if layer.last_stats is not None]

    def log_replans(self, step: int, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Log the re-plans ``largeep_plugin.rebalance`` returned (each has its ``"layer"``)."""
        out = []
        for record in records:
            line = {"step": int(step), "layer": str(record["layer"]),
                    "replan": {k: v for k, v in record.items() if k != "layer"}}
            self._file.write(json.dumps(line) + "\n")
            out.append(line)
        self._file.flush()
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "LoadMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_monitor(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read back the records a ``LoadMonitor`` wrote."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
