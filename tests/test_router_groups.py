"""Routing of the model families: group-limited top-k (hand-made scores, ties included), routed scaling, the
learned router bias, float32/float64 routing under autocast and in a bf16 model, no host synchronisation, the
sequence-wise and global-batch balancing losses against hand computations, and the errors of bad settings."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import world
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.load_balance import sequence_aux_loss, switch_aux_loss
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference
from largeep_plugin.layer.router import Router, route, select_experts


def _cfg(num_experts: int = 8, top_k: int = 2, **kw: object) -> LargeEPConfig:
    return LargeEPConfig(hidden_size=num_experts, ffn_hidden_size=4, num_experts=num_experts, top_k=top_k, **kw)


# ---- group-limited selection, by hand ---------------------------------------------------------------------------
def test_groups_by_hand() -> None:
    # 8 experts in 4 groups of 2: {0,1} {2,3} {4,5} {6,7}; binary fractions, so sums are exact.
    s = torch.tensor([[0.75, 0.0, 0.5, 0.5, 0.625, 0.125, 0.125, 0.25]])
    # Group scores, top-2 sums: 0.75, 1.0, 0.75, 0.375 -> keep 2 groups: {2,3} then {0,1} (0.75 ties with {4,5}:
    # the lower group wins) -> top-2 of {0,1,2,3}: 0 (0.75), then 2 and 3 tie at 0.5: the lower index, 2.
    assert select_experts(s, 2, num_groups=4, group_topk=2, group_score_topk=2).tolist() == [[0, 2]]
    # Top-1 group scores (the max, DeepSeek-V2): 0.75, 0.5, 0.625, 0.25 -> groups {0,1} and {4,5} -> 0, 4.
    assert select_experts(s, 2, num_groups=4, group_topk=2, group_score_topk=1).tolist() == [[0, 4]]
    # One group kept: {2,3} by top-2 sum; both of its experts, the tie to the lower index first.
    assert select_experts(s, 2, num_groups=4, group_topk=1, group_score_topk=2).tolist() == [[2, 3]]
    # Without groups: plain top-2, 0.625 beats the 0.5 pair.
    assert select_experts(s, 2).tolist() == [[0, 4]]
    # All equal: every tie goes to the lower index, groups and experts alike.
    assert select_experts(torch.zeros(1, 8), 3, num_groups=4, group_topk=2, group_score_topk=2).tolist() == [[0, 1, 2]]
    # Negative selection scores (a large negative bias) inside the kept groups still beat the masked experts.
    neg = torch.tensor([[-5.0, -6.0, -1.0, -2.0, 3.0, -9.0, -9.0, -9.0]])
    # Group scores (max): -5, -1, 3, -9 -> keep {4,5} and {2,3}; top-3 there: 4, 2, 3 (5 at -9 loses).
    assert select_experts(neg, 3, num_groups=4, group_topk=2, group_score_topk=1).tolist() == [[4, 2, 3]]


def test_groups_route_by_hand_with_bias_scaling_and_reference() -> None:
    """route(): groups are chosen on score + bias, weights are the unbiased scores, normalised, then scaled."""
    cfg = _cfg(8, 2, score_function="sigmoid", num_groups=4, group_topk=2, routed_scaling_factor=2.5)
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.4, 1.0, 0.9, -2.0, 3.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.9])
    r = route(logits, torch.eye(8), bias, cfg.router_config)
    s = torch.sigmoid(logits)[0]
    sel = s + bias
    # Group scores (top-2 sums of score + bias): {0,1} .88+.27, {2,3} .62+.60, {4,5} .73+.71, {6,7} .12+.05:
    # groups {4,5} and {2,3}, so experts 4 and 5, although plain top-2 of score + bias would pick 0 and 4.
    assert r.topk_ids_TK.tolist() == [[4, 5]]
    assert select_experts(sel.unsqueeze(0), 2).tolist() == [[0, 4]]
    # Without the bias expert 7 (.95) would win plain top-k; its group would still lose: (.95 + .12) < 1.22.
    want = torch.stack([s[4], s[5]]) / (s[4] + s[5]) * 2.5
    torch.testing.assert_close(r.topk_weights_TK[0], want)
    ref = DenseMoEReference(cfg)
    with torch.no_grad():
        ref.router.weight.copy_(torch.eye(8))
        ref.router.expert_bias.copy_(bias)
    rr = ref.router(logits)
    assert rr.topk_ids_TK.tolist() == [[4, 5]]
    torch.testing.assert_close(rr.topk_weights_TK, r.topk_weights_TK)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(4, 2, 2), (4, 1, 1), (2, 1, 2), (8, 3, 1)])
def test_groups_match_the_reference_on_random_and_tied_scores(score: str, groups: tuple[int, int, int]) -> None:
    g, keep, n = groups
    cfg = _cfg(16, 3, score_function=score, num_groups=g, group_topk=keep, group_score_topk=n, init_std=0.5)
    gen = torch.Generator().manual_seed(g * 10 + keep)
    x = torch.randn(300, 16, generator=gen)
    x[::3] = x[::3].round()  # integer inputs with an identity router: many exact ties
    weight = torch.eye(16)
    bias = torch.randn(16, generator=gen).round(decimals=1) * 0.1
    got = route(x, weight, bias, cfg.router_config)
    ref = DenseMoEReference(cfg)
    with torch.no_grad():
        ref.router.weight.copy_(weight)
        ref.router.expert_bias.copy_(bias)
    want = ref.router(x)
    assert torch.equal(got.topk_ids_TK, want.topk_ids_TK)
    torch.testing.assert_close(got.topk_weights_TK, want.topk_weights_TK)
    size = 16 // g
    per_token_groups = [len(set((row // size).tolist())) for row in got.topk_ids_TK]
    assert max(per_token_groups) <= keep


def test_router_bias_is_part_of_the_logits() -> None:
    cfg = _cfg(4, 2, router_bias=True, init_std=0.5)
    router = Router(cfg.router_config, 4, init_std=0.5, init_seed=3)
    plain = Router(_cfg(4, 2).router_config, 4, init_std=0.5, init_seed=3)
    assert router.bias is not None and router.bias.shape == (4,) and plain.bias is None
    torch.testing.assert_close(router.weight, plain.weight)  # the bias is drawn after the weight
    x = torch.randn(5, 4)
    torch.testing.assert_close(router(x).logits_TE, x @ router.weight.t() + router.bias)
    router(x).topk_weights_TK.sum().backward()
    assert router.bias.grad is not None and float(router.bias.grad.abs().sum()) > 0


# ---- dtypes -------------------------------------------------------------------------------------------------------
def test_router_is_float32_under_autocast_and_in_a_bf16_model() -> None:
    cfg = _cfg(8, 2, score_function="sigmoid", num_groups=4, group_topk=2, init_std=0.5)
    router = Router(cfg.router_config, 8, init_std=0.5, init_seed=1)
    x = torch.randn(64, 8)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = router(x)
    assert under.logits_TE.dtype == torch.float32 and under.topk_weights_TK.dtype == torch.float32
    torch.testing.assert_close(under.logits_TE, want.logits_TE, rtol=0, atol=0)
    assert torch.equal(under.topk_ids_TK, want.topk_ids_TK)
    for dtype in (torch.bfloat16, torch.float16):
        low = Router(cfg.router_config, 8, init_std=0.5, init_seed=1).to(dtype)
        assert low.expert_bias.dtype == torch.float32
        got = low(x.to(dtype))
        assert got.logits_TE.dtype == torch.float32 and got.topk_weights_TK.dtype == torch.float32
        exact = torch.nn.functional.linear(x.to(dtype).float(), low.weight.float())
        torch.testing.assert_close(got.logits_TE, exact, rtol=0, atol=0)  # not rounded to the model dtype


def test_float64_router() -> None:
    cfg = _cfg(8, 2, router_dtype="float64")
    router = Router(cfg.router_config, 8, init_std=0.5, init_seed=1)
    r = router(torch.randn(6, 8))
    assert r.logits_TE.dtype == torch.float64 and r.scores_TE.dtype == torch.float64
    assert r.topk_weights_TK.dtype == torch.float32


# ---- no host synchronisation ----------------------------------------------------------------------------------------
_SYNC_OPS = ("nonzero", "_local_scalar_dense", "item", "bincount", "masked_select", "unique")


class _SyncCounter(TorchDispatchMode):
    """Counts the operators that read a device value on the host (or hide such a read)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        bool_index = name.startswith("index") and any(
            isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
            for a in args)
        if name in _SYNC_OPS or bool_index:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_routing_never_reads_the_device_on_the_host() -> None:
    cfg = _cfg(16, 4, score_function="sigmoid", num_groups=4, group_topk=2, routed_scaling_factor=2.5,
               router_bias=True, seq_aux_loss_coeff=0.1)
    router = Router(cfg.router_config, 16, init_std=0.5, init_seed=1)
    router.expert_bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(32, 16)
    with _SyncCounter() as counter:
        r = router(x)
        sequence_aux_loss(r.scores_TE, r.topk_ids_TK, torch.arange(32) // 8, 4, "sigmoid")
    assert counter.seen == []
    with _SyncCounter() as counter:  # the counter itself catches a sync-prone operator
        torch.bincount(r.topk_ids_TK.flatten())
        r.scores_TE[r.scores_TE > 0.5]
    assert "bincount.default" in counter.seen and len(counter.seen) >= 2


# ---- balancing losses, by hand ---------------------------------------------------------------------------------
def _hand_switch(probs: list[list[float]], chosen: list[list[int]], e: int) -> float:
    k = len(chosen[0])
    t = len(probs)
    f = [sum(row.count(j) for row in chosen) / (t * k) for j in range(e)]
    p = [sum(row[j] for row in probs) / t for j in range(e)]
    return e * sum(fj * pj for fj, pj in zip(f, p))


def test_sequence_loss_by_hand() -> None:
    # Two sequences of 3 tokens, 3 experts, top-1.
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3],
                           [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    ids = torch.tensor([[0], [0], [1], [2], [2], [0]])
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    got = sequence_aux_loss(scores, ids, seq, 2, "softmax")
    want = (_hand_switch(scores[:3].tolist(), ids[:3].tolist(), 3) + _hand_switch(scores[3:].tolist(), ids[3:].tolist(), 3)) / 2
    # Sequence 0: f = (2/3, 1/3, 0), P = (0.5, 1/3, 1/6): 3 * (1/3 + 1/9) = 4/3. Sequence 1: f = (1/3, 0, 2/3),
    # P = (0.3, 0.2667, 0.4333): 3 * (0.1 + 0.2889) = 1.1667.
    assert abs(want - (4 / 3 + 3 * (0.3 / 3 + 2 * 1.3 / 9)) / 2) < 1e-6
    assert abs(float(got) - want) < 1e-6
    # One sequence of all six tokens is the switch loss of the batch; interleaved ids ([S, B] layout) differ.
    whole = sequence_aux_loss(scores, ids, torch.zeros(6, dtype=torch.int64), 1, "softmax")
    assert abs(float(whole) - float(switch_aux_loss(scores, torch.bincount(ids.flatten(), minlength=3), 1, "softmax"))) < 1e-6
    interleaved = sequence_aux_loss(scores, ids, torch.arange(6) % 2, 2, "softmax")
    assert abs(float(interleaved) - want) > 1e-3
    # Sigmoid scores are normalised per token first.
    sig = sequence_aux_loss(scores * 3, ids, seq, 2, "sigmoid")
    assert abs(float(sig) - float(got)) < 1e-6


def test_layer_sequence_loss_follows_the_input_shape() -> None:
    cfg = _cfg(1, 1, seq_aux_loss_coeff=0.5, score_function="sigmoid")
    x = torch.randn(2, 3, 1)
    layer, ref = LargeEPMoE(cfg), DenseMoEReference(cfg)
    for shape in ((2, 3, 1), (6, 1)):
        _, aux = layer(x.reshape(shape), return_aux=True)
        _, aux_ref = ref(x.reshape(shape), return_aux=True)
        assert abs(float(aux.detach()) - float(aux_ref.detach())) < 1e-6
        assert abs(float(aux.detach()) - 0.5) < 1e-6  # one expert: f = 1, P = 1 in every sequence


def _global_rank(rank: int, world_size: int) -> dict[str, float]:
    """2 data-parallel copies of an EP group of 2: the global-batch loss counts all 4 ranks' tokens, accumulated over
    micro-batches until reset; the switch loss counts only the EP group's tokens of this forward."""
    ep = [[0, 1], [2, 3]]
    groups = [dist.new_group(r) for r in ep]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_group, dp_group = groups[rank // 2], dp_groups[rank % 2]
    cfg = LargeEPConfig(hidden_size=6, ffn_hidden_size=4, num_experts=2, top_k=1, init_std=0.7,
                        global_aux_loss_coeff=1.0)
    from largeep_plugin.layer.process_groups import build_process_groups
    from largeep_plugin.placement.plan import Placement

    expert_groups = build_process_groups(Placement.identity(2), ep_ranks=ep)
    layer = LargeEPMoE(cfg, ep_group, expert_groups=expert_groups, dp_group=dp_group)
    batches = [torch.randn(5 + 2 * r, 6, generator=torch.Generator().manual_seed(10 * m + r)) for m in range(2)
               for r in range(4)]
    out = {}
    for m in range(2):
        x = batches[4 * m + rank]
        _, aux = layer(x, return_aux=True)
        # By hand: every rank's choices of every micro-batch so far (the router weights are the same everywhere).
        counts = torch.zeros(2)
        for mm in range(m + 1):
            for r in range(4):
                ids = layer.router(batches[4 * mm + r]).topk_ids_TK
                counts += torch.bincount(ids.flatten(), minlength=2)
        p = layer.router(x).scores_TE.mean(dim=0)
        want = 2 * float((counts / counts.sum() * p).sum())
        out[f"micro{m}"] = abs(float(aux) - want)
        out[f"micro{m}_value"] = float(aux)
    layer.reset_global_load()
    out["reset"] = float(layer.global_batch_tokens_E.sum())
    return out


def test_global_batch_loss_counts_every_copy_and_micro_batch() -> None:
    results = world(_global_rank, 4)
    for r in results:
        assert r["micro0"] < 1e-6 and r["micro1"] < 1e-6, r
        assert r["reset"] == 0.0
        assert r["micro0_value"] > 0


# ---- bad settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(num_groups=3), "num_groups=3"),
    (dict(num_groups=4, group_topk=5), "group_topk=5"),
    (dict(num_groups=4, group_topk=0), "group_topk=0"),
    (dict(num_groups=4), "group_topk"),
    (dict(group_topk=2), "group_topk=2"),
    (dict(num_groups=8, group_topk=1, top_k=2), "top_k=2"),
    (dict(num_groups=4, group_topk=2, group_score_topk=3), "group_score_topk=3"),
    (dict(num_groups=0, group_topk=1), "num_groups=0"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor=-1.0"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor=0"),
    (dict(router_dtype="bf16"), "router_dtype='bf16'"),
    (dict(seq_aux_loss_coeff=-0.1), "seq_aux_loss_coeff=-0.1"),
    (dict(global_aux_loss_coeff=float("nan")), "global_aux_loss_coeff=nan"),
    (dict(router_bias=1), "router_bias=1"),
])
def test_bad_routing_settings_name_the_field(kw: dict, field: str) -> None:
    kw = {"top_k": 2, **kw}
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace("[", r"\[")):
        LargeEPConfig(hidden_size=8, ffn_hidden_size=8, num_experts=8, **kw)
