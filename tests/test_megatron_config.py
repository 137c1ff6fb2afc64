"""Megatron config -> LargeEPConfig translation, and the clear errors for what the large-EP layer does not do."""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import world  # noqa: E402
from megatron_helpers import error_of, init_megatron, tiny_config  # noqa: E402

from largeep_plugin.integrations.megatron import large_ep_config_from_megatron  # noqa: E402


def config(**overrides: Any) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: dict[str, Any] = dict(
        num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=64, moe_ffn_hidden_size=32,
        num_moe_experts=8, moe_router_topk=2, add_bias_linear=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def test_translation_reads_the_megatron_moe_settings() -> None:
    lep = large_ep_config_from_megatron(
        config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_expert_capacity_factor=1.5, init_method_std=0.03),
        {"init_seed": 7, "check_inputs": False},
    )
    assert (lep.hidden_size, lep.ffn_hidden_size, lep.num_experts, lep.top_k) == (16, 32, 8, 2)
    assert (lep.activation, lep.score_function, lep.normalize_topk) == ("gelu", "softmax", True)
    assert (lep.capacity_factor, lep.aux_loss_coeff, lep.z_loss_coeff, lep.init_std) == (1.5, 0.01, 0.001, 0.03)
    assert (lep.init_seed, lep.check_inputs, lep.linear_bias) == (7, False, False)


@pytest.mark.parametrize(
    "megatron, field, want",
    [
        (dict(moe_router_pre_softmax=True), "normalize_topk", False),  # Megatron: softmax over all, no renormalising
        (dict(moe_router_score_function="sigmoid"), "normalize_topk", True),  # sigmoid, k > 1: renormalised
        (dict(moe_router_score_function="sigmoid", moe_router_topk=1), "normalize_topk", False),
        (dict(gated_linear_unit=True, activation_func=F.silu), "activation", "swiglu"),
        (dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.5), "aux_loss_coeff", 0.0),
        (dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
              moe_router_bias_update_rate=0.05), "bias_update_rate", 0.05),
        # Expert TP is accepted; the config keeps the whole expert's width (the layer cuts the shards).
        (dict(expert_tensor_parallel_size=2), "ffn_hidden_size", 32),
    ],
)
def test_translation_follows_megatron_semantics(megatron: dict[str, Any], field: str, want: Any) -> None:
    assert getattr(large_ep_config_from_megatron(config(**megatron)), field) == want


def test_translation_of_the_model_families() -> None:
    """DeepSeek-V3, Qwen2-MoE, Qwen3 and gpt-oss settings, as Megatron writes them."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    dsv3 = large_ep_config_from_megatron(config(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk=4, moe_router_topk_scaling_factor=2.5, moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=48, moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-4, gated_linear_unit=True, activation_func=F.silu))
    assert (dsv3.num_groups, dsv3.group_topk, dsv3.group_score_topk, dsv3.routed_scaling_factor) == (4, 2, 2, 2.5)
    assert (dsv3.shared_ffn_hidden_size, dsv3.shared_expert_gate, dsv3.seq_aux_loss_coeff) == (48, False, 1e-4)
    assert (dsv3.aux_loss_coeff, dsv3.global_aux_loss_coeff, dsv3.router_dtype) == (0.0, 0.0, "float32")
    qwen2 = large_ep_config_from_megatron(config(
        moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True,
        moe_shared_expert_overlap=True, moe_token_dispatcher_type="alltoall", moe_router_dtype="fp64"))
    assert (qwen2.normalize_topk, qwen2.shared_ffn_hidden_size, qwen2.shared_expert_gate) == (False, 40, True)
    assert qwen2.router_dtype == "float64"
    qwen3 = large_ep_config_from_megatron(config(
        moe_router_load_balancing_type=["global_aux_loss", "aux_loss"], moe_aux_loss_coeff=[1e-3, 1e-2]))
    assert (qwen3.global_aux_loss_coeff, qwen3.aux_loss_coeff, qwen3.seq_aux_loss_coeff) == (1e-3, 1e-2, 0.0)
    oss = config(add_bias_linear=True, gated_linear_unit=True, activation_func=quick_gelu, glu_linear_offset=1.0,
                 activation_func_clamp_value=7.0, bias_activation_fusion=False)
    oss_lep = large_ep_config_from_megatron(oss)
    assert (oss_lep.activation, oss_lep.swiglu_limit, oss_lep.swiglu_alpha) == ("swiglu_oai", 7.0, 1.702)
    assert oss_lep.router_bias and oss_lep.linear_bias


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(num_moe_experts=None), ValueError, "num_moe_experts=None"),
        (dict(moe_router_num_groups=2, moe_router_group_topk=1), NotImplementedError, "moe_router_pre_softmax=False"),
        (dict(moe_router_num_groups=2), ValueError, "moe_router_group_topk=None"),
        (dict(moe_router_num_groups=4, moe_router_group_topk=4, moe_router_score_function="sigmoid"), ValueError,
         "moe_router_topk=2 < moe_router_group_topk=4"),
        (dict(moe_router_topk_limited_devices=2), NotImplementedError, "moe_router_topk_limited_devices=2"),
        (dict(moe_router_load_balancing_type="sinkhorn"), NotImplementedError, "'sinkhorn'"),
        (dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1, sequence_parallel=True,
              tensor_model_parallel_size=2), NotImplementedError, "sequence_parallel=True"),
        (dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=0.1), ValueError,
         "one coefficient per type"),
        (dict(moe_router_dtype="fp16"), NotImplementedError, "moe_router_dtype='fp16'"),
        (dict(moe_shared_expert_intermediate_size=8, moe_shared_expert_overlap=True,
              overlap_moe_expert_parallel_comm=True), NotImplementedError, "moe_shared_expert_overlap=True"),
        (dict(gated_linear_unit=True, activation_func=F.silu, glu_linear_offset=1.0), NotImplementedError,
         "glu_linear_offset=1.0"),
        (dict(moe_token_drop_policy="position"), NotImplementedError, "moe_token_drop_policy='position'"),
        (dict(moe_latent_size=8), NotImplementedError, "moe_latent_size=8"),
        (dict(activation_func=F.relu), NotImplementedError, "activation_func"),
        (dict(context_parallel_size=2), NotImplementedError, "context_parallel_size=2"),
        (dict(delay_wgrad_compute=True), NotImplementedError, "delay_wgrad_compute=True"),
        (dict(moe_token_dispatcher_type="flex"), NotImplementedError, "moe_token_dispatcher_type='flex'"),
    ],
)
def test_unsupported_megatron_settings_name_themselves(change: dict[str, Any], error: type, words: str) -> None:
    cfg = config()
    for key, value in change.items():  # set after construction: Megatron's own checks would stop some earlier
        setattr(cfg, key, value)
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        large_ep_config_from_megatron(cfg)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"bias_rate": 1e-3}, r"unknown large_ep key\(s\) \['bias_rate'\]; valid keys are"),
        ({"top_k": 3}, r"top_k=3 contradicts the Megatron config \(moe_router_topk gives 2\)"),
        ({"num_experts": 8, "hidden_size": 32}, r"hidden_size=32 contradicts the Megatron config"),
        ({"bias_update_rate": -1.0}, r"bias_update_rate=-1.0 must be a finite number >= 0"),
    ],
)
def test_bad_overrides_name_the_field(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        large_ep_config_from_megatron(config(), overrides)


def test_bias_rate_conflict_with_megatron_bias_update() -> None:
    cfg = config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    with pytest.raises(ValueError, match="contradicts moe_router_bias_update_rate=0.001"):
        large_ep_config_from_megatron(cfg, {"bias_update_rate": 0.01})


def _layer_checks(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import build_module

    from largeep_plugin.integrations.megatron import LargeEPExperts, LargeEPMoELayer

    init_megatron(ep=2)
    cfg = tiny_config()
    errors: dict[str, Any] = {}
    # LargeEPMoELayer.__init__ sets MoELayer's attributes itself: none of the stock layer's may be missing.
    stock_cfg = tiny_config(moe_token_dispatcher_type="allgather")  # the stock dispatcher that builds on CPU
    stock = build_module(get_moe_module_spec(use_te=False, num_experts=2), config=stock_cfg)
    errors["missing_attributes"] = sorted(set(vars(stock)) - set(vars(LargeEPMoELayer(cfg))))

    def attempt(name: str, fn: Any) -> None:
        errors[name] = error_of(fn)

    attempt("overlap", lambda: LargeEPMoELayer(cfg, large_ep={"overlap_chunks": 2}))
    attempt("router", lambda: LargeEPMoELayer(cfg, MoESubmodules(experts=LargeEPExperts, router=TopKRouter)))
    layer = LargeEPMoELayer(cfg, layer_number=3)
    x = torch.randn(4, 2, cfg.hidden_size)
    attempt("padding", lambda: layer(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool)))
    bad = x.clone()
    if rank == 1:
        bad[0, 0, 0] = float("nan")
    attempt("nan", lambda: layer(bad))
    return errors


def test_layer_errors_are_clear_on_every_rank() -> None:
    for errors in world(_layer_checks, 2, timeout=120):
        assert errors["missing_attributes"] == [], "MoELayer sets attributes that LargeEPMoELayer does not"
        assert errors["overlap"].startswith("NotImplementedError: overlap_chunks=2"), errors
        assert "MoESubmodules.router" in errors["router"] and "LargeEPRouter" in errors["router"], errors
        assert errors["padding"].startswith("NotImplementedError: padding_mask"), errors
        # The NaN is on rank 1 only; both ranks raise, naming the rank (no hang in the all-to-all).
        assert errors["nan"] == "ValueError: LargeEPRouter (layer 3): input contains NaN or Inf on EP rank(s) [1]", errors
