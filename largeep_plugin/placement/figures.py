"""The traffic model behind expert placement: where tokens go, how much crosses each inter-node link.

Pure functions on CPU float64 tensors. They see a placement only as ``capacity_BNE``: the share of expert e's
work that node n holds (replicas on n / replicas of e), so the planner can score a batch of B candidate layouts in
one call and a ``Placement`` can score itself.

Shape suffixes: B candidate layouts, N nodes, E experts, W ranks.

The model, step by step (docs/placement.md has the reasoning):

1. Source tokens are spread evenly over the ranks, so node a sends a share ``source_N[a]`` = (ranks on a) / W
   of the tokens of every expert.
2. Routing (``route_flows``) is "same node first, then the least-loaded replica", taken in expectation: tokens
   fill the replicas on their own node up to each replica's fair share (load / replicas), and what is left goes
   to the nodes with spare replica capacity, in proportion to it. Every replica then gets exactly its fair share,
   so the per-GPU load depends only on how many replicas each expert has, not on where they are.
3. Traffic (``link_tokens``) assumes node-batched dispatch: a token crosses from node a to node b once if any of
   its top-k experts is served on b. With X = the number of a token's experts served on b, P(X >= 1) is
   estimated from the two moments that ``load`` and ``coactivation`` give (``crossings``). Without
   co-activation each (token, expert) pair is counted on its own (E[X]), as flat dispatch would send it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from largeep_plugin.placement.topology import Topology, as_int


def route_flows(capacity_BNE: torch.Tensor, source_N: torch.Tensor) -> torch.Tensor:
    """Expected routing: the share of all tokens choosing expert e that go from node a to node b.

    Args:
        capacity_BNE: float64 [B, N, E], share of expert e's replicas on node n (each column sums to 1, or less
            while a layout is being built: work for replicas not placed yet is then left out).
        source_N: float64 [N], share of the source tokens on each node (sums to 1).
    Returns:
        flow_BNNE: float64 [B, N(src a), N(dst b), E]; summed over b it is source_N[a] when the column is full.
    """
    src = source_N.view(1, -1, 1)
    local = torch.minimum(src, capacity_BNE)          # step 1: served on the source's own node
    excess = src - local                              # what node a cannot serve itself
    spare = capacity_BNE - local                      # room left on node b's replicas
    # step 2: spread the excess over the spare room; dividing by the larger sum keeps within the room when
    # part of the capacity is not placed yet (partial layouts while seeding)
    denom = torch.maximum(excess.sum(1, keepdim=True), spare.sum(1, keepdim=True))
    share = torch.where(denom > 0, spare / denom.clamp_min(1e-300), torch.zeros_like(spare))
    flow = excess.unsqueeze(2) * share.unsqueeze(1)   # [B, a, b, E]; zero on a == b (excess_a > 0 => spare_a = 0)
    return flow + torch.diag_embed(local.transpose(1, 2)).permute(0, 2, 3, 1)


@dataclass(frozen=True, kw_only=True, eq=False)
class RoutingStats:
    """The routing statistics a placement is scored on.

    Fields:
        load_E: float64 [E], tokens that chose each expert.
        coact_EE: float64 [E, E], tokens that chose both experts (diagonal ignored), or None.
        top_k: K experts per token, or None when unknown (then only lower bounds are used, see ``crossings``).
        source_N: float64 [N], share of the source tokens on each node.
    """

    load_E: torch.Tensor
    coact_EE: torch.Tensor | None
    top_k: int | None
    source_N: torch.Tensor

    @property
    def pairs_EE(self) -> torch.Tensor | None:
        """``coact_EE`` with a zero diagonal."""
        if self.coact_EE is None:
            return None
        return self.coact_EE - torch.diag(torch.diagonal(self.coact_EE))


def link_tokens(flow_BNNE: torch.Tensor, stats: RoutingStats) -> torch.Tensor:
    """Expected tokens that cross from node a to node b in one dispatch (node-batched).

    Args:
        flow_BNNE: float64 [B, N, N, E] from ``route_flows``.
        stats: load, co-activation, top-k and source shares.
    Returns:
        tokens_BNN: float64 [B, N(src), N(dst)], zero diagonal. The combine sends the same amounts back
        (the transpose).
    """
    m1 = torch.einsum("bxye,e->bxy", flow_BNNE, stats.load_E)
    pairs = stats.pairs_EE
    if pairs is None:
        return crossings(m1, None, stats)
    m2 = torch.einsum("bxye,ef,bxyf->bxy", flow_BNNE, pairs, flow_BNNE)
    return crossings(m1, m2 / stats.source_N.view(1, -1, 1).clamp_min(1e-300), stats)


def crossings(m1_BNN: torch.Tensor, m2_BNN: torch.Tensor | None, stats: RoutingStats) -> torch.Tensor:
    """Tokens from node a with at least one expert served on node b (zero diagonal), from two moments of X:

    m1 = tokens from a * E[X] = sum_e load_e * flow[a, b, e];
    m2 = tokens from a * E[X(X-1)] = sum_{e != f} C_ef * flow[a, b, e] * flow[a, b, f] / source[a]
    (ordered pairs of a token's experts both served on b, each expert's replica picked independently).

    Lower bounds that need nothing else: m1 - m2/2 (Bonferroni; exact when K <= 2) and m1^2 / (m1 + m2)
    (second moment). With K known, X is fitted by a beta-binomial on K draws with the same two moments
    (a hypergeometric when the experts on b are chosen together less often than by chance), which is exact
    for K <= 2 and follows the large-K case closely; the result is kept between the lower bounds and
    min(m1, tokens from a). Without co-activation: m1.
    """
    if m2_BNN is None:
        est = m1_BNN
    else:
        bonferroni = m1_BNN - 0.5 * m2_BNN
        second_moment = torch.where(m1_BNN > 0, m1_BNN * m1_BNN / (m1_BNN + m2_BNN).clamp_min(1e-300),
                                    torch.zeros_like(m1_BNN))
        lower = torch.minimum(torch.maximum(bonferroni, second_moment), m1_BNN)
        est = lower if stats.top_k is None or stats.top_k < 3 else _fit_crossings(m1_BNN, m2_BNN, lower, stats)
    eye = torch.eye(est.shape[-1], dtype=torch.bool)
    return est.masked_fill(eye, 0.0)


def _fit_crossings(m1: torch.Tensor, m2: torch.Tensor, lower: torch.Tensor, stats: RoutingStats) -> torch.Tensor:
    """tokens_a * P(X >= 1) for X beta-binomial on K draws with p = E[X] / K and
    g = P(2nd on b | 1st on b) = E[X(X-1)] / (E[X] (K-1)): P(X = 0) = prod_i (beta + i) / (s + i) with
    s = (1 - g) / (g - p), beta = (1 - p) s (binomial (1 - p)^K when g = p; s < 0 is the hypergeometric)."""
    k = stats.top_k
    tokens_a = (stats.load_E.sum() / k * stats.source_N).view(1, -1, 1)
    p = (m1 / (k * tokens_a)).clamp(0.0, 1.0)
    g = torch.where(m1 > 0, m2 / ((k - 1) * m1.clamp_min(1e-300)), torch.zeros_like(m1)).clamp(0.0, 1.0 - 1e-12)
    binomial = torch.abs(g - p) < 1e-9
    s = (1.0 - g) / torch.where(binomial, torch.ones_like(g), g - p)
    beta = (1.0 - p) * s
    none_on_b = torch.ones_like(m1)
    for i in range(k):
        none_on_b = none_on_b * (beta + i) / (s + i)
    none_on_b = torch.where(binomial, (1.0 - p) ** k, none_on_b)
    fit = tokens_a * (1.0 - none_on_b)
    fit = torch.where(torch.isfinite(fit), fit, lower)
    return torch.maximum(torch.minimum(fit, torch.minimum(m1, tokens_a.expand_as(m1))), lower)


@dataclass(frozen=True, kw_only=True)
class PlacementFigures:
    """What a placement costs on given routing statistics.

    Fields:
        gpu_load: [W] tokens' worth of expert work per GPU (an expert-TP rank does 1/t of each token's work).
        max_gpu_load, mean_gpu_load: the largest and the mean of ``gpu_load``; the mean is the lower bound
            (total work / GPUs) that no placement can beat.
        link_bytes: [N][N] bytes sent from node a to node b in one dispatch (diagonal 0; combine: transpose).
        max_link_bytes: the largest entry of ``link_bytes``; ``max_link``: its (a, b).
        max_link_seconds: the largest bytes / bandwidth + latency over the links that carry data (what the
            planner minimises; it ranks links like ``link_bytes`` when all inter-node links are alike).
        total_internode_bytes: the sum of ``link_bytes``.
    """

    gpu_load: tuple[float, ...]
    max_gpu_load: float
    mean_gpu_load: float
    link_bytes: tuple[tuple[float, ...], ...]
    max_link_bytes: float
    max_link: tuple[int, int]
    max_link_seconds: float
    total_internode_bytes: float

    @property
    def gpu_imbalance(self) -> float:
        """max / mean GPU load (1.0 is perfect balance)."""
        return self.max_gpu_load / self.mean_gpu_load if self.mean_gpu_load > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gpu_imbalance": self.gpu_imbalance}


def make_figures(*, gpu_load_W: torch.Tensor, link_tokens_NN: torch.Tensor, bandwidth_NN: torch.Tensor,
                 latency_NN: torch.Tensor, bytes_per_token: float) -> PlacementFigures:
    """Assemble ``PlacementFigures`` from per-GPU work [W] and link tokens [N, N] (bandwidth in bytes/s [N, N],
    latency in seconds [N, N])."""
    link_bytes = link_tokens_NN * bytes_per_token
    seconds = torch.where(link_bytes > 0, link_bytes / bandwidth_NN + latency_NN, torch.zeros_like(link_bytes))
    flat = int(torch.argmax(link_bytes).item())
    n = link_bytes.shape[0]
    return PlacementFigures(
        gpu_load=tuple(gpu_load_W.tolist()), max_gpu_load=float(gpu_load_W.max()),
        mean_gpu_load=float(gpu_load_W.mean()), link_bytes=tuple(tuple(r) for r in link_bytes.tolist()),
        max_link_bytes=float(link_bytes.max()), max_link=(flat // n, flat % n),
        max_link_seconds=float(seconds.max()), total_internode_bytes=float(link_bytes.sum()),
    )


def _as_float_tensor(name: str, value: Any) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be numbers, got {type(value).__name__}: {err}") from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has a non-finite entry: {t.tolist()!r:.200}")
    if (t < 0).any():
        raise ValueError(f"{name} has a negative entry: {float(t.min())}")
    return t.cpu()


def as_load(load: Any, num_experts: int) -> torch.Tensor:
    """Check ``load`` (tokens per expert, [E]; None = uniform) and return it as float64 [E]."""
    if load is None:
        return torch.ones(num_experts, dtype=torch.float64)
    t = _as_float_tensor("load", load)
    if t.shape != (num_experts,):
        raise ValueError(f"load must have one entry per expert ({num_experts}), got shape {tuple(t.shape)}")
    if t.sum() <= 0:
        raise ValueError("load sums to 0: no token was routed")
    return t


def as_coactivation(coactivation: Any, load_E: torch.Tensor) -> torch.Tensor | None:
    """Check ``coactivation`` ([E, E] tokens that chose both experts; None allowed) against ``load_E``."""
    if coactivation is None:
        return None
    e = load_E.numel()
    c = _as_float_tensor("coactivation", coactivation)
    if c.shape != (e, e):
        raise ValueError(f"coactivation must be [{e}, {e}] (experts x experts), got shape {tuple(c.shape)}")
    scale = float(c.abs().max()) + 1e-12
    if not torch.allclose(c, c.T, rtol=0.0, atol=1e-6 * scale):
        i, j = divmod(int((c - c.T).abs().argmax()), e)
        raise ValueError(f"coactivation must be symmetric: [{i}][{j}]={float(c[i, j])} but [{j}][{i}]={float(c[j, i])}")
    off = c - torch.diag(torch.diagonal(c))
    bound = torch.minimum(load_E.view(-1, 1), load_E.view(1, -1))
    over = off > bound * (1 + 1e-6) + 1e-9
    if over.any():
        i, j = (int(v) for v in torch.nonzero(over)[0])
        raise ValueError(f"coactivation[{i}][{j}]={float(c[i, j])} exceeds the load of expert {i} or {j} "
                         f"({float(load_E[i])}, {float(load_E[j])}): were load and co-activation recorded together?")
    return c


def source_shares(topology: Topology) -> torch.Tensor:
    """float64 [N]: share of the source tokens on each node (tokens spread evenly over the ranks)."""
    return torch.tensor([n.num_gpus for n in topology.nodes], dtype=torch.float64) / topology.world_size


def routing_stats(num_experts: int, topology: Topology, load: Any, coactivation: Any,
                  top_k: int | None) -> RoutingStats:
    """Check user statistics and bundle them. ``load`` [E] (None: uniform), ``coactivation`` [E, E] or None,
    ``top_k`` or None. With both ``coactivation`` and ``top_k``, every token chose exactly K distinct experts, so
    the off-diagonal sum must be (sum of load) * (K - 1): a mismatch means the files or K do not belong together.
    """
    load_E = as_load(load, num_experts)
    coact_EE = as_coactivation(coactivation, load_E)
    if top_k is not None:
        given, top_k = top_k, as_int(top_k)
        if top_k is None or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an integer in [1, {num_experts}], got {given!r}")
        if coact_EE is not None:
            pairs = float(coact_EE.sum() - torch.diagonal(coact_EE).sum())
            expected = float(load_E.sum()) * (top_k - 1)
            if abs(pairs - expected) > 0.01 * max(expected, 1.0):
                raise ValueError(f"coactivation off-diagonal sum {pairs:g} != load sum x (top_k - 1) = {expected:g} "
                                 f"for top_k={top_k}: were they recorded with this top_k?")
    return RoutingStats(load_E=load_E, coact_EE=coact_EE, top_k=top_k, source_N=source_shares(topology))
