"""Dynamic replicas inside Megatron-Core (``large_ep={"dynamic_replicas": 1}`` through the layer spec), 4 gloo ranks.

A 2-layer GPTModel with a skewed selection bias (expert 0 in every token's top 2) trains four SGD steps under
``GlooDataParallel`` and ``finalize_model_grads``, with ``install_bias_update_hook`` running
``largeep_plugin.rebalance`` after each step; once with torch SGD, once with Megatron's chained optimizer
(``megatron_helpers.megatron_adam``: the hook runs after its last part, the experts', stepped). The same model without dynamic replicas (whose layer equals the
dense reference: tests/test_megatron_layer.py) is the oracle: per-step losses and every expert's weights equal
(1e-5), while the plan holds clones from the first step on and the clones receive rows. Also refused with clear
errors: Megatron's fine-grained EP overlap and expert tensor parallelism.
"""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402

from conftest import world  # noqa: E402
from megatron_helpers import init_megatron, megatron_adam, megatron_step, tiny_config, tiny_gpt, tokens  # noqa: E402,E501

EP, VOCAB, SEQ, STEPS, LR = 4, 32, 8, 4, 0.1


def _train(rank: int, spare: int, megatron_optimizer: bool = False) -> dict[str, Any]:
    from megatron.core.distributed import finalize_model_grads

    from largeep_plugin.integrations.megatron import GlooDataParallel, install_bias_update_hook, large_ep_moe_layers
    from largeep_plugin.layer.experts import SlotExperts

    init_megatron(ep=EP)
    cfg = tiny_config(num_layers=2, num_moe_experts=EP)
    model = tiny_gpt(cfg, seed=0, vocab=VOCAB, seq=SEQ,
                     large_ep={"dynamic_replicas": spare, "rebalance_decay": 0.0, "bias_update_rate": 0.0})
    layers = [layer for _, layer in large_ep_moe_layers(model)]
    for layer in layers:
        layer.router.expert_bias[0] = 3.0
    ddp = GlooDataParallel(cfg, model)
    # Megatron's optimizer chains a dense and an expert-parallel part: the hook must refresh the clones after the
    # experts' part stepped, not between the two.
    optimizer = megatron_adam(model, 1e-2) if megatron_optimizer else torch.optim.SGD(model.parameters(), lr=LR)
    hook = install_bias_update_hook(model, optimizer)
    clone_rows: list[int] = []
    real_call = SlotExperts.__call__

    def counting(experts: Any, rows: Any, counts: Any, dev: Any = None) -> Any:
        lh = len(counts[0]) - spare
        clone_rows.append(sum(c for per in counts for c in per[lh:]))
        return real_call(experts, rows, counts, dev)

    SlotExperts.__call__ = counting  # type: ignore[method-assign]
    losses, clones = [], []
    try:
        for step in range(STEPS):
            ddp.zero_grad_buffer()
            ids, pos = tokens(2, SEQ, VOCAB, seed=100 * step + rank)
            loss = ddp(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            finalize_model_grads([ddp])
            megatron_step(optimizer) if megatron_optimizer else optimizer.step()  # the hook: bias update, rebalance
            losses.append(float(loss))
            clones.append([layer.clones.plan.num_clones if layer.clones is not None else 0 for layer in layers])
    finally:
        SlotExperts.__call__ = real_call  # type: ignore[method-assign]
        hook.remove()
    experts = {(i, e): m.fc1.weight.detach().clone()
               for i, layer in enumerate(layers) for e, m in layer.experts.experts_by_id()}
    return {"losses": losses, "clones": clones, "clone_rows": sum(clone_rows), "experts": experts}


def _refusals(rank: int) -> dict[str, str]:
    out = {}
    init_megatron(ep=EP)
    for name, overrides in (("overlap", {"overlap_moe_expert_parallel_comm": True, "bf16": True,
                                         "moe_token_dispatcher_type": "alltoall"}),):
        try:
            tiny_gpt(tiny_config(num_moe_experts=EP, **overrides), large_ep={"dynamic_replicas": 1})
            out[name] = "no error"
        except (ValueError, NotImplementedError, AssertionError) as err:
            out[name] = f"{type(err).__name__}: {err}"
    init_megatron(ep=2, etp=2)
    try:
        tiny_gpt(tiny_config(num_moe_experts=2), large_ep={"dynamic_replicas": 1})
        out["expert_tp"] = "no error"
    except (ValueError, NotImplementedError) as err:
        out["expert_tp"] = f"{type(err).__name__}: {err}"
    return out


def _rank(rank: int, world_size: int) -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    return {"static": _train(rank, 0), "dynamic": _train(rank, 1), "static_megatron": _train(rank, 0, True),
            "dynamic_megatron": _train(rank, 1, True), "refusals": _refusals(rank)}


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return world(_rank, EP, timeout=300.0)


@pytest.mark.parametrize("optimizer", ["torch", "megatron"])
def test_training_equals_the_run_without_clones(results: list[dict[str, Any]], optimizer: str) -> None:
    suffix = "_megatron" if optimizer == "megatron" else ""
    for r, res in enumerate(results):
        static, dynamic = res["static" + suffix], res["dynamic" + suffix]
        assert max(abs(a - b) for a, b in zip(static["losses"], dynamic["losses"])) < 1e-5, (r, static, dynamic)
        for key, w in static["experts"].items():
            err = float((dynamic["experts"][key] - w).abs().max() / w.abs().max())
            assert err < 1e-5, (r, key, err)
    clones = results[0]["dynamic" + suffix]["clones"]
    assert all(n > 0 for per_step in clones for n in per_step), clones
    assert sum(res["dynamic" + suffix]["clone_rows"] for res in results) > 0


def test_unsupported_combinations_are_refused(results: list[dict[str, Any]]) -> None:
    refusals = results[0]["refusals"]
    assert "overlap_moe_expert_parallel_comm=True" in refusals["overlap"], refusals
    assert "dynamic_replicas=1 with expert_tensor_parallel_size=2" in refusals["expert_tp"], refusals
