"""``largeep_plugin.hf.convert_model``: converted Hugging Face MoE models equal the unconverted ones.

Every rank feeds the same tokens, so after ``allreduce_gradients`` (dense gradients averaged over the R ranks,
expert gradients -- which the all-to-all summed over the R identical copies -- divided by R) every gradient must
equal the unconverted model's. Compared per family, at EP 4 with one expert per rank and with 8 experts colocated
two per rank (and Mixtral with 2 experts, each on two ranks): logits, loss, Hugging Face's aux loss (``output_router_logits=True``), the router logits, every
dense gradient, the router's and this rank's experts' gradients.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from conftest import world  # noqa: E402
from hf_models import tiny_model, tokens  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.shape == b.shape else float("inf")


def _compare(family: str, num_experts: int) -> dict[str, float]:
    """Errors of the converted model against the unconverted one (run inside a rank)."""
    import largeep_plugin as lep
    from largeep_plugin.hf import convert_model
    from largeep_plugin.integrations.hf.weights import expert_from_hf

    ref = tiny_model(family, num_experts)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the colocation warning
        convert_model(model, allow_colocate=num_experts > 4)
    ids = tokens()
    out = model(ids, labels=ids, output_router_logits=True)
    want = ref(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    want.loss.backward()
    lep.allreduce_gradients(model)

    errors = {"logits": _max_diff(out.logits, want.logits), "loss": _max_diff(out.loss, want.loss)}
    errors["router_logits"] = max(_max_diff(a, b) for a, b in zip(out.router_logits, want.router_logits))
    errors["n_router_logits"] = float(len(out.router_logits) != len(want.router_logits) or not out.router_logits)
    if family == "deepseek_v3":  # DeepseekV3ForCausalLM computes no aux loss
        errors["aux_loss"] = float(out.aux_loss is not None or want.aux_loss is not None)
    else:
        errors["aux_loss"] = _max_diff(out.aux_loss, want.aux_loss)
    ref_params = dict(ref.named_parameters())
    dense = 0.0
    for name, p in model.named_parameters():
        if ".mlp.moe." not in name:
            dense = max(dense, _max_diff(p.grad, ref_params[name].grad))
    errors["dense_grads"] = dense
    grads = {"router": 0.0, "experts": 0.0}
    for name, block in model.named_modules():
        if type(block).__name__ != "LargeEPHFBlock":
            continue
        hf_block = ref.get_submodule(name)
        hf_grads = {k: p.grad for k, p in hf_block.named_parameters()}
        router = block.family.router
        grads["router"] = max(grads["router"], _max_diff(block.moe.router.weight.grad, hf_grads[f"{router}.weight"]))
        if block.family.router_bias:
            grads["router"] = max(grads["router"], _max_diff(block.moe.router.bias.grad, hf_grads[f"{router}.bias"]))
        for expert_id, expert in block.moe.local_experts():
            want_grads = expert_from_hf(block.family, lambda n, e: hf_grads[n][e], expert_id)   # layout mapping
            for key, g in want_grads.items():
                grads["experts"] = max(grads["experts"], _max_diff(expert.get_parameter(key).grad, g))
    errors.update(grads)
    errors["scale"] = float(want.logits.abs().max())
    return errors


def _parity_world(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    cases = {f"{family} E={e}": _compare(family, e) for family in FAMILIES for e in (world_size, 2 * world_size)}
    cases["mixtral E=2, replicated"] = _compare("mixtral", world_size // 2)   # fewer experts than ranks
    return cases


def test_families_equal_unconverted_at_ep4() -> None:
    per_rank = world(_parity_world, 4, timeout=300.0)
    bad = {f"rank {r} {case}": {k: v for k, v in errs.items() if k != "scale" and not v <= 1e-5}
           for r, cases in enumerate(per_rank) for case, errs in cases.items()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, bad
    assert min(errs["scale"] for cases in per_rank for errs in cases.values()) > 1e-2


def test_unsupported_block_names_its_class() -> None:
    from largeep_plugin.hf import convert_model

    class FancyMoeBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), FancyMoeBlock())
    with pytest.raises(NotImplementedError, match=r"1: FancyMoeBlock looks like an MoE block \(an 'experts' "
                                                  r"submodule\) but its class is not supported; supported: "
                                                  r".*Mixtral.*DeepSeek-V3"):
        convert_model(model)


def test_nothing_is_silent_in_conversion() -> None:
    """Every structure transformers uses for MoE blocks, unregistered, is an error naming the class; a model with
    nothing converted is an error unless the caller says that is fine."""
    import transformers as tf

    from largeep_plugin.hf import convert_model

    jetmoe = tf.AutoModelForCausalLM.from_config(tf.JetMoeConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, kv_channels=8, intermediate_size=32,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match=r"^model.layers.0.mlp: JetMoeMoE looks like an MoE block "
                                                  r"\('input_linear' and 'output_linear' experts\)"):
        convert_model(jetmoe)

    class StackedGateMoE(torch.nn.Module):   # a gate and experts as one [E, F, H] parameter
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(4, 3)
            self.w1 = torch.nn.Parameter(torch.zeros(3, 8, 4))

    class RouterMoE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = torch.nn.Linear(4, 3)
            self.mlp = torch.nn.Linear(4, 4)

    for block, parts in ((StackedGateMoE(), r"a 'gate' beside expert weights \['w1'\]"),
                         (RouterMoE(), r"a 'router' submodule")):
        with pytest.raises(NotImplementedError, match=rf"^0\.1: {type(block).__name__} looks like an MoE block "
                                                      rf"\({parts}\)"):
            convert_model(torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), block)))

    dense = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=4, intermediate_size=32,
                                                               vocab_size=64))
    with pytest.raises(ValueError, match=r"^convert_model: LlamaForCausalLM has no MoE block to convert .*"
                                         r"pass allow_no_moe=True"):
        convert_model(dense)
    assert convert_model(dense, allow_no_moe=True) is dense
    # A dense MLP with a gate projection (and Qwen2-MoE's shared-expert gate, every registered family) is no MoE.
    assert convert_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), allow_no_moe=True) is not None


def _colocation_warnings(rank: int, world_size: int) -> list[str]:
    """The warnings two conversions of a colocated model (EP 2, 4 experts) show on this rank, as printed."""
    from largeep_plugin.hf import convert_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            convert_model(tiny_model("mixtral", 4), allow_colocate=True)
    return [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught]


def test_colocation_warns_once_per_world_without_a_source_line() -> None:
    per_rank = world(_colocation_warnings, 2)
    assert per_rank[1] == [], per_rank
    (shown,) = per_rank[0]
    assert shown.startswith("largeep:0: UserWarning: LargeEPMoE: 4 experts on 2 ranks, up to 2 per rank") and \
        shown.count("\n") == 1, shown


@pytest.mark.parametrize("override, match", [
    (dict(bogus_rate=1.0), r"unknown override bogus_rate=1.0"),
    (dict(num_experts=8), r"num_experts=8 is defined by the model"),
    (dict(top_k=1), r"top_k=1 is defined by the model"),
])
def test_bad_overrides_are_named(override: dict, match: str) -> None:
    from largeep_plugin.hf import convert_model

    model = tiny_model("mixtral", 4)
    with pytest.raises(ValueError, match=match):
        convert_model(model, **override)
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"  # refused before anything changed


def test_plugin_overrides_reach_the_layer_and_ep1_holds_every_expert() -> None:
    from largeep_plugin.hf import convert_model

    model = convert_model(tiny_model("qwen3_moe", 4), capacity_factor=2.0, bias_update_rate=0.01)
    moe = model.model.layers[1].mlp.moe
    assert (moe.config.capacity_factor, moe.config.bias_update_rate) == (2.0, 0.01)
    assert moe.expert_ids == (0, 1, 2, 3)   # no torch.distributed: one process, every expert


def _colocate_refused(rank: int, world_size: int) -> str:
    from largeep_plugin.hf import convert_model

    try:
        convert_model(tiny_model("mixtral", 8))
    except ValueError as e:
        return str(e)
    return "converted"


def test_more_experts_than_ranks_needs_allow_colocate() -> None:
    for message in world(_colocate_refused, 2):
        assert "8 experts on EP size 2" in message and "allow_colocate=True" in message


def test_router_logits_reach_hf_when_converted_after_a_forward() -> None:
    """transformers installs its output hooks on the first forward; a conversion afterwards must still feed them."""
    from largeep_plugin.hf import convert_model

    ref = tiny_model("qwen2_moe", 4)
    model = copy.deepcopy(ref)
    ids = tokens()
    model(ids, output_router_logits=True)   # hooks installed on the Hugging Face routers now
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_model(model)
    out, want = model(ids, output_router_logits=True), ref(ids, output_router_logits=True)
    assert len(out.router_logits) == len(want.router_logits) == 2
    assert max(_max_diff(a, b) for a, b in zip(out.router_logits, want.router_logits)) <= 1e-5
    assert _max_diff(out.aux_loss, want.aux_loss) <= 1e-5
