"""Top-k routing: scores, biased selection with unbiased weights, counts, and capacity drops."""
from __future__ import annotations

import math

import pytest
import torch

from largeep_plugin.layer.config import LargeEPConfig, RouterConfig
from largeep_plugin.layer.router import Router, capacity_keep_mask, expert_capacity, route


def _rcfg(num_experts: int, top_k: int, **kw: object) -> RouterConfig:
    return LargeEPConfig(hidden_size=8, ffn_hidden_size=8, num_experts=num_experts, top_k=top_k, **kw).router_config


def _data(t: int = 40, h: int = 8, e: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, generator=gen), torch.randn(e, h, generator=gen)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_scores_choices_and_weights(score_function: str, normalize: bool) -> None:
    x_TH, w_EH = _data()
    cfg = _rcfg(6, 2, score_function=score_function, normalize_topk=normalize)
    r = route(x_TH, w_EH, torch.zeros(6), cfg)
    logits = x_TH @ w_EH.T
    scores = torch.softmax(logits, -1) if score_function == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(r.logits_TE, logits)
    torch.testing.assert_close(r.scores_TE, scores)
    # The two best experts, best first.
    assert torch.equal(r.topk_ids_TK, scores.argsort(dim=-1, descending=True)[:, :2])
    chosen = scores.gather(1, r.topk_ids_TK)
    want = chosen / chosen.sum(-1, keepdim=True) if normalize else chosen
    torch.testing.assert_close(r.topk_weights_TK, want)
    assert torch.equal(r.tokens_per_expert_E, torch.bincount(r.topk_ids_TK.flatten(), minlength=6))
    assert int(r.tokens_per_expert_E.sum()) == 80
    assert bool(r.keep_TK.all()) and int(r.num_dropped) == 0


def test_bias_changes_choice_not_weights_by_hand() -> None:
    # Router weight = identity, so the logits are the tokens themselves.
    x = torch.tensor([[2.0, 1.0, 0.0]])
    cfg = _rcfg(3, 2)
    s = torch.softmax(x, -1)[0]
    plain = route(x, torch.eye(3), torch.zeros(3), cfg)
    assert plain.topk_ids_TK.tolist() == [[0, 1]]
    biased = route(x, torch.eye(3), torch.tensor([0.0, 0.0, 1.0]), cfg)
    assert biased.topk_ids_TK.tolist() == [[2, 0]]  # expert 2 wins on score + bias
    # ... but its weight is its own (small) score, renormalised with expert 0's.
    want = torch.stack([s[2], s[0]]) / (s[2] + s[0])
    torch.testing.assert_close(biased.topk_weights_TK[0], want)
    assert float(biased.topk_weights_TK[0, 0]) < 0.2


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_bias_changes_choice_not_weights(score_function: str) -> None:
    x_TH, w_EH = _data(t=200)
    cfg = _rcfg(6, 2, score_function=score_function)
    bias = torch.tensor([0.0, 0.15, -0.1, 0.3, 0.0, -0.2])
    plain = route(x_TH, w_EH, torch.zeros(6), cfg)
    biased = route(x_TH, w_EH, bias, cfg)
    assert torch.equal(biased.topk_ids_TK, torch.topk(plain.scores_TE + bias, 2).indices)
    changed = (plain.topk_ids_TK.sort(-1).values != biased.topk_ids_TK.sort(-1).values).any(-1)
    assert 10 < int(changed.sum()) < 200, "the bias should change some choices, not all"
    chosen = plain.scores_TE.gather(1, biased.topk_ids_TK)
    torch.testing.assert_close(biased.topk_weights_TK, chosen / chosen.sum(-1, keepdim=True))
    # Where the chosen set is unchanged, the weights are exactly the unbiased ones.
    same = ~changed
    torch.testing.assert_close(_weights_by_expert(biased)[same], _weights_by_expert(plain)[same], rtol=0, atol=0)
    assert not torch.equal(plain.tokens_per_expert_E, biased.tokens_per_expert_E)


def _weights_by_expert(r) -> torch.Tensor:
    """Each token's K weights ordered by expert id (the order of choice may differ between two routings)."""
    return r.topk_weights_TK.gather(1, r.topk_ids_TK.argsort(-1))


def test_router_weight_gets_the_gradient_of_the_weights() -> None:
    x_TH, w_EH = _data()
    cfg = _rcfg(6, 2, score_function="sigmoid")
    w = w_EH.clone().requires_grad_(True)
    c_TK = torch.randn(40, 2, generator=torch.Generator().manual_seed(5))
    r = route(x_TH, w, torch.zeros(6), cfg)
    (r.topk_weights_TK * c_TK).sum().backward()
    w2 = w_EH.clone().requires_grad_(True)
    chosen = torch.sigmoid(x_TH @ w2.T).gather(1, r.topk_ids_TK)
    ((chosen / chosen.sum(-1, keepdim=True)) * c_TK).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    assert float(w.grad.abs().max()) > 1e-3


def test_router_module() -> None:
    cfg = _rcfg(5, 2)
    a, b, c = Router(cfg, 8, init_seed=3), Router(cfg, 8, init_seed=3), Router(cfg, 8, init_seed=4)
    assert a.weight.shape == (5, 8)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert a.expert_bias.dtype == torch.float32 and not bool(a.expert_bias.any())
    assert "expert_bias" in a.state_dict() and all(p is not a.expert_bias for p in a.parameters())
    x = torch.randn(7, 8)
    a.expert_bias[4] = 5.0
    assert bool((a(x).topk_ids_TK[:, 0] == 4).all())


def test_low_precision_input_routes_in_float32() -> None:
    x_TH, w_EH = _data()
    r = route(x_TH.bfloat16(), w_EH.bfloat16(), torch.zeros(6), _rcfg(6, 2))
    assert r.logits_TE.dtype == r.scores_TE.dtype == r.topk_weights_TK.dtype == torch.float32


def test_no_tokens() -> None:
    r = route(torch.zeros(0, 8), torch.randn(6, 8), torch.zeros(6), _rcfg(6, 2, capacity_factor=1.0))
    assert r.topk_ids_TK.shape == r.topk_weights_TK.shape == r.keep_TK.shape == (0, 2)
    assert r.tokens_per_expert_E.tolist() == [0] * 6


def test_expert_capacity() -> None:
    assert expert_capacity(10, 4, 2, 1.0) == 5
    assert expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(3, 4, 1, 0.5) == 1
    assert expert_capacity(16, 8, 2, 1.25) == 5


def test_capacity_drops_the_lowest_scores() -> None:
    ids = torch.tensor([[0], [0], [0], [1]])
    scores = torch.tensor([[0.2], [0.9], [0.5], [0.3]])
    assert capacity_keep_mask(ids, scores, 2, 2).flatten().tolist() == [False, True, True, True]
    assert capacity_keep_mask(ids, scores, 2, 1).flatten().tolist() == [False, True, False, True]


def test_capacity_ties_are_deterministic() -> None:
    # Equal scores: the earlier token wins, then the earlier k.
    ids = torch.tensor([[0], [0], [0], [0]])
    equal = torch.full((4, 1), 0.5)
    assert capacity_keep_mask(ids, equal, 1, 2).flatten().tolist() == [True, True, False, False]
    ids2 = torch.tensor([[0, 1], [1, 0]])
    assert capacity_keep_mask(ids2, torch.full((2, 2), 0.5), 2, 1).tolist() == [[True, True], [False, False]]
    # Same ties across many experts, computed twice: identical.
    gen = torch.Generator().manual_seed(1)
    many_ids = torch.randint(0, 4, (50, 2), generator=gen)
    coarse = torch.randint(0, 3, (50, 2), generator=gen).float() / 3  # lots of ties
    first = capacity_keep_mask(many_ids, coarse, 4, 6)
    assert torch.equal(first, capacity_keep_mask(many_ids, coarse.clone(), 4, 6))


@pytest.mark.parametrize("normalize", [True, False])
def test_route_with_capacity(normalize: bool) -> None:
    x_TH, w_EH = _data(t=60, e=4)
    cfg = _rcfg(4, 2, capacity_factor=0.75, normalize_topk=normalize)
    r = route(x_TH, w_EH, torch.zeros(4), cfg)
    cap = math.ceil(0.75 * 60 * 2 / 4)
    plain = route(x_TH, w_EH, torch.zeros(4), _rcfg(4, 2, normalize_topk=normalize))
    assert torch.equal(r.topk_ids_TK, plain.topk_ids_TK)
    assert torch.equal(r.tokens_per_expert_E, plain.tokens_per_expert_E)  # counted before drops
    chosen = r.scores_TE.gather(1, r.topk_ids_TK)
    dropped_total = 0
    for e in range(4):
        mine = r.topk_ids_TK == e
        kept, dropped = chosen[mine & r.keep_TK], chosen[mine & ~r.keep_TK]
        assert kept.numel() == min(cap, int(mine.sum()))
        if dropped.numel():
            assert float(kept.min()) >= float(dropped.max())
        dropped_total += dropped.numel()
    assert int(r.num_dropped) == dropped_total > 0
    assert not bool(r.topk_weights_TK[~r.keep_TK].any())
    torch.testing.assert_close(r.topk_weights_TK[r.keep_TK], plain.topk_weights_TK[r.keep_TK])


def test_expert_bias_stays_float32_when_the_model_is_cast() -> None:
    """Casting a model to bf16 must not round the selection bias: a step of 1e-3 on a bias of 1.0 survives."""
    from largeep_plugin.layer.moe_layer import LargeEPMoE

    layer = LargeEPMoE(LargeEPConfig(hidden_size=8, ffn_hidden_size=8, num_experts=1, top_k=1)).to(torch.bfloat16)
    assert layer.expert.fc1.weight.dtype == torch.bfloat16
    assert layer.router.expert_bias.dtype == torch.float32
    layer.router.expert_bias.fill_(1.0)
    layer.router.expert_bias.add_(1e-3)
    assert float(layer.router.expert_bias[0]) == pytest.approx(1.001, abs=1e-6)
    assert "router.expert_bias" in dict(layer.named_buffers())


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_router_stays_float32_under_autocast_and_in_low_precision_models(model_dtype: torch.dtype) -> None:
    """Under ``torch.autocast`` the linear would run in the autocast dtype: the router switches it off, so its
    logits, scores and combine weights are float32 and equal the float32 routing of the same (rounded) numbers."""
    cfg = _rcfg(8, 2)
    router = Router(cfg, 16, init_std=0.5).to(model_dtype)
    x = torch.randn(32, 16).to(model_dtype)
    want = route(x.float(), router.weight.float(), router.expert_bias, cfg)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = router(x)
        for name in ("logits_TE", "scores_TE", "topk_weights_TK"):
            t = getattr(got, name)
            assert t.dtype == torch.float32, (autocast, name, t.dtype)
            assert torch.equal(t, getattr(want, name)), (autocast, name)
        assert torch.equal(got.topk_ids_TK, want.topk_ids_TK)
