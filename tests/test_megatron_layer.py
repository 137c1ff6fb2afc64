"""The large-EP layer inside Megatron-Core at EP 4 (4 gloo ranks, one world for all checks):

* a ``TransformerLayer`` built from the spec helper is an MoE layer holding ``LargeEPMoELayer``;
* its forward and backward equal the same ``TransformerLayer`` whose mlp is the plugin's dense reference
  (output, input gradient, every attention/norm gradient, the router gradient, each rank's expert gradient summed
  over the ranks' tokens), for GELU/softmax/top-2 with a z-loss and SwiGLU/sigmoid/top-2;
* sigmoid routing with ``moe_router_enable_expert_bias``: Megatron's ``finalize_model_grads`` moves the bias by
  ``rate * sign(mean - count)`` of the counts summed over all ranks, and zeroes the counts;
* softmax routing: ``finalize_model_grads`` leaves the bias alone and the plugin's optimizer hook moves it;
* the switch loss (global counts) joins the backward through Megatron's ``MoEAuxLossAutoScaler``;
* the per-expert load goes to the ``LoadMonitor`` and to a TensorBoard-like writer;
* the router alone drives Megatron's own ``MoELayer`` (its ``RouterInterface`` contract).
"""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import rel_err, world  # noqa: E402
from megatron_helpers import compare_transformer_layers, init_megatron, layer_and_reference, tiny_config, tiny_gpt, tokens  # noqa: E402

EP = 4
TOL = 1e-5


class _DenseReferenceMLP(torch.nn.Module):
    """The plugin's ``DenseMoEReference`` as a TransformerLayer mlp; the z-loss joins the backward as the large-EP
    router attaches it (Megatron's ``MoEAuxLossAutoScaler``)."""

    def __init__(self, config: Any, **_: Any):
        super().__init__()
        from largeep_plugin.integrations.megatron import large_ep_config_from_megatron
        from largeep_plugin.layer.reference import DenseMoEReference

        self.ref = DenseMoEReference(large_ep_config_from_megatron(config))

    def forward(self, x: torch.Tensor, padding_mask: Any = None):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        y, aux = self.ref(x, return_aux=True)
        return MoEAuxLossAutoScaler.apply(y, aux), None


def _parity(config: Any, rank: int) -> dict[str, float]:
    from largeep_plugin.integrations.megatron import LargeEPMoELayer, TorchSDPAttention, get_gpt_layer_spec_with_large_ep

    spec = get_gpt_layer_spec_with_large_ep(EP, core_attention=TorchSDPAttention)
    layer, ref = layer_and_reference(spec, config, _DenseReferenceMLP)
    assert layer.is_moe_layer and isinstance(layer.mlp, LargeEPMoELayer) and layer.mlp.expert_id == rank

    errors, y_ref = compare_transformer_layers(layer, ref, config.hidden_size, rank)
    errors["router"] = rel_err(layer.mlp.router.weight.grad, ref.mlp.ref.router.weight.grad)
    # The expert of this rank saw every rank's tokens: its gradient is the sum over ranks of the reference's.
    for expert in ref.mlp.ref.experts:
        for p in expert.parameters():
            dist.all_reduce(p.grad)
    for name, p in layer.mlp.experts.expert.named_parameters():
        errors[f"expert.{name}"] = rel_err(p.grad, ref.mlp.ref.experts[rank].get_parameter(name).grad)
        assert p.allreduce is False
    errors["scale"] = float(y_ref.abs().max())
    return errors


def _aux_loss_check(rank: int) -> dict[str, float]:
    """The switch loss rides on Megatron's MoEAuxLossAutoScaler: with the output's gradient zero, the router gets
    exactly the gradient of c * switch_aux_loss(this rank's scores, the EP group's global counts), and none at c=0."""
    from largeep_plugin.integrations.megatron import LargeEPMoELayer
    from largeep_plugin.layer.load_balance import switch_aux_loss

    x = torch.randn(6, 2, 12, generator=torch.Generator().manual_seed(7 + rank))
    grads, stats = {}, {}
    for coeff in (0.0, 0.1):
        cfg = tiny_config(moe_aux_loss_coeff=coeff)
        layer = LargeEPMoELayer(cfg, layer_number=1)
        y, _ = layer(x)
        (0.0 * y).sum().backward()  # no gradient from the output: what reaches the router is the aux loss alone
        grads[coeff] = layer.router.weight.grad.clone()
        stats[coeff] = layer.last_stats
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    scores = torch.softmax(x.reshape(-1, 12) @ weight.t(), dim=-1)
    aux = 0.1 * switch_aux_loss(scores, stats[0.1].tokens_per_expert_E, 2, "softmax")
    aux.backward()
    return {
        "grad": rel_err(grads[0.1], weight.grad),
        "grad_off": float(grads[0.0].abs().max()),
        "value": abs(float(stats[0.1].aux_loss) - float(aux)),
        "off": float(stats[0.0].aux_loss),
    }


def _step_and_counts(model: Any, rank: int) -> list[torch.Tensor]:
    """One forward+backward on this rank's tokens; returns each router's counts summed over all ranks."""
    from largeep_plugin.integrations.megatron import large_ep_moe_layers

    ids, pos = tokens(2, 8, 32, seed=rank)
    model(ids, pos, None, labels=ids).float().mean().backward()
    counts = []
    for _, layer in large_ep_moe_layers(model):
        c = layer.router.local_tokens_per_expert.clone()
        assert float(c.sum()) == 2 * 8 * 2  # B * S * K assignments of this rank
        dist.all_reduce(c)
        counts.append(c)
    return counts


def _biases(model: Any) -> list[torch.Tensor]:
    from largeep_plugin.integrations.megatron import large_ep_moe_layers

    return [layer.router.expert_bias.clone() for _, layer in large_ep_moe_layers(model)]


def _bias_checks(rank: int) -> dict[str, Any]:
    from megatron.core.distributed import finalize_model_grads

    from largeep_plugin.integrations.megatron import GlooDataParallel, install_bias_update_hook, large_ep_moe_layers

    out: dict[str, Any] = {}
    # Sigmoid + moe_router_enable_expert_bias: Megatron's finalize_model_grads does the update.
    cfg = tiny_config(num_layers=2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_router_bias_update_rate=0.01)
    model = tiny_gpt(cfg)
    counts = _step_and_counts(model, rank)
    before = _biases(model)
    finalize_model_grads([GlooDataParallel(cfg, model)])
    after = _biases(model)
    out["sigmoid_bias_err"] = max(
        float((a - (b + 0.01 * torch.sign(c.mean() - c))).abs().max()) for a, b, c in zip(after, before, counts)
    )
    out["sigmoid_moved"] = min(float((a - b).abs().max()) for a, b in zip(after, before))
    out["sigmoid_counts_left"] = max(
        float(layer.router.local_tokens_per_expert.abs().sum()) for _, layer in large_ep_moe_layers(model)
    )
    out["sigmoid_bias"] = [a.tolist() for a in after]

    # Softmax: finalize_model_grads leaves the bias alone; the plugin's hook moves it after the optimizer step.
    cfg = tiny_config(num_layers=2)
    model = tiny_gpt(cfg, large_ep={"bias_update_rate": 0.01})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    install_bias_update_hook(model, optimizer)
    counts = _step_and_counts(model, rank)
    before = _biases(model)
    finalize_model_grads([GlooDataParallel(cfg, model)])
    out["softmax_finalize_moved"] = max(float((a - b).abs().max()) for a, b in zip(_biases(model), before))
    optimizer.step()
    after = _biases(model)
    out["softmax_bias_err"] = max(
        float((a - (b + 0.01 * torch.sign(c.mean() - c))).abs().max()) for a, b, c in zip(after, before, counts)
    )
    out["softmax_moved"] = min(float((a - b).abs().max()) for a, b in zip(after, before))
    optimizer.step()  # no forward since: no counts, so no movement
    out["softmax_idle_moved"] = max(float((a - b).abs().max()) for a, b in zip(_biases(model), after))
    out["softmax_bias"] = [a.tolist() for a in after]
    out["model"] = model
    return out


def _logging_checks(rank: int, model: Any, path: str) -> dict[str, Any]:
    from largeep_plugin.integrations.megatron import large_ep_moe_layers, log_expert_load
    from largeep_plugin.layer.load_balance import LoadMonitor, read_monitor

    class Writer:
        def __init__(self) -> None:
            self.scalars: dict[str, tuple[float, int]] = {}

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars[tag] = (value, step)

    with torch.no_grad():
        ids, pos = tokens(3, 8, 32, seed=50 + rank)
        model(ids, pos, None)
    if rank != 0:
        return {}
    writer = Writer()
    with LoadMonitor(path) as monitor:
        records = log_expert_load(model, 7, monitor=monitor, writer=writer)
    layers = dict(large_ep_moe_layers(model))
    return {
        "records": records,
        "file": read_monitor(path),
        "writer": writer.scalars,
        "router_counts": {name: layer.last_stats.tokens_per_expert_E.tolist() for name, layer in layers.items()},
    }


def _ep4_rank(rank: int, world_size: int, path: str) -> dict[str, Any]:
    init_megatron(ep=EP)
    out: dict[str, Any] = {}
    gelu_softmax = tiny_config(moe_z_loss_coeff=1e-2)
    swiglu_sigmoid = tiny_config(gated_linear_unit=True, activation_func=F.silu, moe_router_score_function="sigmoid")
    out["parity"] = {"gelu-softmax-zloss": _parity(gelu_softmax, rank), "swiglu-sigmoid": _parity(swiglu_sigmoid, rank)}
    out["aux"] = _aux_loss_check(rank)
    try:
        tiny_gpt(tiny_config(num_moe_experts=8))
        out["mismatch"] = "no error"
    except ValueError as e:
        out["mismatch"] = str(e)
    bias = _bias_checks(rank)
    model = bias.pop("model")
    out["bias"] = bias
    out["logging"] = _logging_checks(rank, model, path)
    return out


@pytest.fixture(scope="module")
def ep4(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = str(tmp_path_factory.mktemp("load") / "load.jsonl")
    return world(_ep4_rank, EP, path, timeout=240)


def test_transformer_layer_matches_dense_reference(ep4: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ep4):
        for case, errors in result["parity"].items():
            assert errors.pop("scale") > 1e-2, (rank, case)
            bad = {k: v for k, v in errors.items() if not v <= TOL}
            assert not bad, f"rank {rank}, {case}: large-EP TransformerLayer differs from the dense reference: {bad}"
            assert len(errors) > 8, errors  # attention and norm gradients were compared too


def test_switch_loss_joins_the_backward(ep4: list[dict[str, Any]]) -> None:
    for result in ep4:
        aux = result["aux"]
        assert aux["grad"] <= TOL and aux["value"] < 1e-6, aux
        assert aux["off"] == 0.0 and aux["grad_off"] == 0.0, aux


def test_experts_must_equal_ep_size(ep4: list[dict[str, Any]]) -> None:
    msg = ep4[0]["mismatch"]
    assert "num_moe_experts=8" in msg and "expert-model-parallel size is 4" in msg, msg


def test_sigmoid_bias_moves_through_finalize_model_grads(ep4: list[dict[str, Any]]) -> None:
    for result in ep4:
        b = result["bias"]
        assert b["sigmoid_bias_err"] < 1e-7 and b["sigmoid_moved"] > 0, b
        assert b["sigmoid_counts_left"] == 0.0
    assert all(r["bias"]["sigmoid_bias"] == ep4[0]["bias"]["sigmoid_bias"] for r in ep4), "biases differ across ranks"


def test_softmax_bias_moves_through_the_plugin_hook(ep4: list[dict[str, Any]]) -> None:
    for result in ep4:
        b = result["bias"]
        assert b["softmax_finalize_moved"] == 0.0, b
        assert b["softmax_bias_err"] < 1e-7 and b["softmax_moved"] > 0, b
        assert b["softmax_idle_moved"] == 0.0, b
    assert all(r["bias"]["softmax_bias"] == ep4[0]["bias"]["softmax_bias"] for r in ep4), "biases differ across ranks"


def test_per_expert_load_goes_to_monitor_and_tensorboard(ep4: list[dict[str, Any]]) -> None:
    log = ep4[0]["logging"]
    assert [r["layer"] for r in log["records"]] == ["layer_1", "layer_2"]
    for record in log["records"]:
        counts = record["counts"]
        assert counts == log["router_counts"][record["layer"]]
        assert sum(counts) == EP * 3 * 8 * 2  # every rank's B * S * K assignments
        assert record["step"] == 7
        for e, count in enumerate(counts):
            assert log["writer"][f"large_ep/{record['layer']}/tokens_per_expert/{e}"] == (count, 7)
        assert log["writer"][f"large_ep/{record['layer']}/imbalance"] == (record["imbalance"], 7)
    assert log["file"] == log["records"]


def _stock_layer_rank(rank: int, world_size: int) -> dict[str, float]:
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from largeep_plugin.integrations.megatron import LargeEPRouter

    init_megatron(ep=1)
    cfg = tiny_config(num_moe_experts=4, moe_token_dispatcher_type="allgather")  # the stock dispatcher CPU can run
    spec = get_moe_module_spec(use_te=False, num_experts=4)
    spec.submodules.router = LargeEPRouter
    torch.manual_seed(0)
    layer = build_module(spec, config=cfg)
    x = torch.randn(5, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    y, _ = layer(x)
    # The same routing applied by hand: y_t = sum_e probs[t, e] * expert_e(x_t) over the chosen experts.
    with torch.no_grad():
        probs_TE, routing_map_TE = layer.router(x)
        x_TH = x.reshape(-1, cfg.hidden_size)
        want = torch.zeros_like(x_TH)
        for e, expert in enumerate(layer.experts.local_experts):
            chosen = routing_map_TE[:, e]
            want[chosen] += probs_TE[chosen, e : e + 1] * expert(x_TH[chosen])[0]
    return {"err": rel_err(y.detach().reshape(-1, cfg.hidden_size), want), "k_per_token": routing_map_TE.sum(1).tolist()}


def test_router_drives_the_stock_moe_layer() -> None:
    """``LargeEPRouter`` as ``MoESubmodules.router`` of Megatron's own MoELayer (RouterInterface contract)."""
    (result,) = world(_stock_layer_rank, 1, timeout=60)
    assert result["k_per_token"] == [2] * 10
    assert result["err"] <= TOL, result


def _collectives_rank(rank: int, world_size: int) -> dict[str, Any]:
    """Count the layer's all_reduce calls in one forward, with and without the switch loss, and its load stats."""
    from unittest import mock

    from largeep_plugin.integrations.megatron import LargeEPMoELayer

    init_megatron(ep=world_size)
    x = torch.randn(7, 2, 12, generator=torch.Generator().manual_seed(40 + rank))
    out = {}
    for coeff in (0.0, 0.1):
        torch.manual_seed(0)
        # Top-1 over 2 experts: uneven counts (top-2 of 2 would give every expert every token, whatever the bug).
        cfg = tiny_config(num_moe_experts=world_size, moe_router_topk=1, moe_router_pre_softmax=True,
                          moe_aux_loss_coeff=coeff)
        layer = LargeEPMoELayer(cfg, layer_number=1)
        calls = []
        real = dist.all_reduce
        with mock.patch.object(dist, "all_reduce", lambda *a, **k: calls.append(1) or real(*a, **k)):
            y, _ = layer(x)
        out[coeff] = {"all_reduces": len(calls), "counts": layer.last_stats.tokens_per_expert_E.tolist(),
                      "dropped": int(layer.last_stats.dropped), "y": y.detach()}
        # This rank's own assignments, counted here from the routing alone (no layer bookkeeping, no collective):
        # the pytest process sums them over the ranks to check the layer's global counts.
        with torch.no_grad():
            ids_TK = layer.router.route_tokens(x.reshape(-1, x.shape[-1])).topk_ids_TK
        out[coeff]["own"] = torch.bincount(ids_TK.flatten(), minlength=world_size).tolist()
    return out


def test_router_counts_ride_in_the_count_exchange_when_no_switch_loss_needs_them() -> None:
    results = world(_collectives_rank, 2)
    # What each expert really got from all ranks, from the ranks' own routing (not from the layer's counts).
    want = [sum(col) for col in zip(*(r[0.0]["own"] for r in results))]
    assert sum(want) == 2 * 7 * 2 and want[0] != want[1], want  # all ranks' tokens x top-1; experts differ
    for r in results:
        # Without the switch loss the global load comes with the dispatcher's count exchange; with it, the router
        # needs it during its forward and all-reduces it. Either way it is every rank's load, expert by expert.
        assert r[0.0]["all_reduces"] == 0 and r[0.1]["all_reduces"] == 1, r
        assert r[0.0]["counts"] == want and r[0.1]["counts"] == want, (r, want)
        assert r[0.0]["dropped"] == r[0.1]["dropped"] == 0
        assert torch.allclose(r[0.0]["y"], r[0.1]["y"], atol=1e-6)
