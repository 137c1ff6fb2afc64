"""DeepSpeed adapter: converting stock `deepspeed.moe.layer.MoE` layers keeps the function (forward and input
gradient), keeps the engine's view of an MoE layer, and the flag off leaves the model untouched.
One world of 4 gloo ranks runs every check."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("deepspeed")

from largeep_plugin.tools.launch import run_world  # noqa: E402

WORLD = 4
H, F = 16, 24


class Net(nn.Module):
    """A stock MoE between two dense layers, as a DeepSpeed user writes it."""

    def __init__(self, ep_size: int, k: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        torch.manual_seed(7)  # every rank builds the same weights; DeepSpeed copies the expert per local slot
        self.inp = nn.Linear(8, H)
        expert = nn.Sequential(nn.Linear(H, F, bias=False), nn.GELU(), nn.Linear(F, H, bias=False))
        self.moe = MoE(H, expert, num_experts=WORLD, ep_size=ep_size, k=k, drop_tokens=False, use_rts=False,
                       top2_2nd_expert_sampling=False)
        with torch.no_grad():  # make the experts differ from each other, the same way on every rank
            gen = torch.Generator().manual_seed(11)
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if ep_size == WORLD:  # one local expert: give it weights of its own (global expert `rank`)
                import torch.distributed as dist

                for p in self.moe.deepspeed_moe.experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + dist.get_rank())))

    def forward(self, x):
        y, _, _ = self.moe(self.inp(x))
        return y


def _stock_vs_converted(ep_size: int, k: int) -> dict:
    import deepspeed.utils.groups as groups
    from largeep_plugin.integrations.deepspeed.engine import _moe_param_groups, ensure_expert_groups
    from largeep_plugin.integrations.section.config import parse_large_ep_section
    from largeep_plugin.integrations.deepspeed.convert import LargeEPDeepSpeedMoE, convert_moe_layers

    stock = Net(ep_size, k)
    stock.moe.set_deepspeed_parallelism()
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(groups.dist.get_rank()))
    x1 = x.clone().requires_grad_(True)
    y_stock = stock(x1)
    y_stock.square().sum().backward()

    section = parse_large_ep_section({"enabled": True, "ep_size": WORLD})
    converted = Net(ep_size, k)
    converted.moe.set_deepspeed_parallelism()
    old_gate = converted.moe.deepspeed_moe.gate.wg.weight
    old_params = list(converted.parameters())
    mapping = convert_moe_layers(converted, section, ensure_expert_groups(WORLD))
    # Parameters listed on the stock model follow the conversion into DeepSpeed's MoE groups.
    groups_out = _moe_param_groups(old_params, mapping, converted)
    converted.moe.set_deepspeed_parallelism()  # what the engine calls: must accept the converted layer
    x2 = x.clone().requires_grad_(True)
    y_conv = converted(x2)
    y_conv.square().sum().backward()
    layer = converted.moe
    keys = sorted(layer.state_dict())
    # Reloading the stock-named state dict restores the internal names.
    fresh = {k_: v.clone() for k_, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.deepspeed_moe.router.weight.zero_()
    layer.load_state_dict(fresh)
    return {
        "max_dy": float((y_stock - y_conv).abs().max()),
        "scale": float(y_stock.abs().max()),
        "max_dx": float((x1.grad - x2.grad).abs().max()),
        "is_moe": isinstance(layer, LargeEPDeepSpeedMoE),
        "keys": keys,
        "gate_mapped": mapping[id(old_gate)] is layer.deepspeed_moe.router.weight,
        "reloaded": torch.equal(layer.deepspeed_moe.router.weight, fresh["deepspeed_moe.gate.wg.weight"]),
        "expert_tags": [(p.allreduce, p.group_name) for p in layer.deepspeed_moe.expert.parameters()],
        "param_groups": [(g["name"], bool(g.get("moe")), len(g["params"])) for g in groups_out],
        "groups_cover_model": sorted(id(p) for g in groups_out for p in g["params"])
        == sorted(id(p) for p in converted.parameters()),
    }


def _flag_off(rank: int) -> dict:
    import deepspeed
    from largeep_plugin.integrations.deepspeed.engine import initialize

    model = Net(WORLD, 2)
    before = [(name, type(m)) for name, m in model.named_modules()]
    params = [id(p) for p in model.parameters()]
    config = {"train_micro_batch_size_per_gpu": 2, "large_ep": {"enabled": False, "overlap": {"chunks": 2}}}
    engine, *_ = initialize(model=model, config=config)
    out = {
        "same_modules": [(n, type(m)) for n, m in engine.module.named_modules()] == before,
        "same_params": [id(p) for p in engine.module.parameters()] == params,
        "engine_is_moe": engine.has_moe_layers,
        "same_object": engine.module is model,
    }
    try:
        initialize(model=Net(WORLD, 2), config={"train_micro_batch_size_per_gpu": 2,
                                                "large_ep": {"enabled": False, "ep_sise": 4}})
    except ValueError as e:
        out["misspelt"] = str(e)
    del deepspeed
    return out


def _world(rank: int, world: int) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    return {
        "top2_ep4": _stock_vs_converted(WORLD, 2),
        "top1_ep4": _stock_vs_converted(WORLD, 1),
        "top2_ep1": _stock_vs_converted(1, 2),
        "flag_off": _flag_off(rank),
    }


@pytest.fixture(scope="module")
def results():
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()  # imports DeepSpeed and loads its CPU op once here, not once per forked rank

    return run_world(_world, WORLD, timeout=240)


@pytest.mark.parametrize("case", ["top2_ep4", "top1_ep4", "top2_ep1"])
def test_conversion_preserves_function(results, case):
    for r in results:
        c = r[case]
        assert c["scale"] > 1e-2  # a real output, not zeros
        assert c["max_dy"] <= 1e-5 * max(1.0, c["scale"]), c
        assert c["max_dx"] <= 1e-4, c


def test_converted_layer_keeps_deepspeed_contract(results):
    c = results[0]["top2_ep4"]
    assert c["is_moe"] and c["gate_mapped"] and c["reloaded"]
    assert c["keys"] == [
        "deepspeed_moe.experts.deepspeed_experts.0.fc1.weight",
        "deepspeed_moe.experts.deepspeed_experts.0.fc2.weight",
        "deepspeed_moe.gate.selection_bias",
        "deepspeed_moe.gate.wg.weight",
    ]
    assert c["expert_tags"] == [(False, f"ep_size_{WORLD}")] * 2


@pytest.mark.parametrize("case", ["top2_ep4", "top2_ep1"])
def test_stock_parameter_list_follows_the_conversion(results, case):
    # inp.weight, inp.bias, router weight in the dense group; this rank's two expert matrices in the MoE group
    # (from the ep_size=1 stock model the three other local experts are gone).
    for r in results:
        assert r[case]["param_groups"] == [("params", False, 3), (f"ep_size_{WORLD}", True, 2)]
        assert r[case]["groups_cover_model"]


def test_flag_off_leaves_model_untouched(results):
    for r in results:
        f = r["flag_off"]
        assert f["same_modules"] and f["same_params"] and f["same_object"]
        assert f["engine_is_moe"]  # still the stock MoE the engine knows
        assert "ep_sise" in f["misspelt"] and "ep_size" in f["misspelt"]
