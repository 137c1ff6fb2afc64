"""LargeEPConfig: strict construction and from_dict, with errors that name the field and the value."""
from __future__ import annotations

import dataclasses

import pytest

from largeep_plugin.layer.config import LargeEPConfig

BASE = dict(hidden_size=16, ffn_hidden_size=32, num_experts=4)


def test_defaults_and_views() -> None:
    cfg = LargeEPConfig(**BASE)
    assert (cfg.top_k, cfg.activation, cfg.score_function, cfg.normalize_topk) == (2, "gelu", "softmax", True)
    assert cfg.capacity_factor is None and cfg.aux_loss_coeff == 0.0 and cfg.z_loss_coeff == 0.0
    assert cfg.overlap_chunks == 1
    full = LargeEPConfig(
        **BASE, top_k=3, activation="swiglu", score_function="sigmoid", normalize_topk=False, capacity_factor=1.5,
        aux_loss_coeff=0.01, z_loss_coeff=0.001, overlap_chunks=2, dispatch="hierarchical", linear_bias=True,
        init_std=0.1,
    )
    r, e, d = full.router_config, full.expert_config, full.dispatch_config
    assert (r.num_experts, r.top_k, r.score_function, r.normalize_topk) == (4, 3, "sigmoid", False)
    assert (r.capacity_factor, r.aux_loss_coeff, r.z_loss_coeff) == (1.5, 0.01, 0.001)
    assert (e.hidden_size, e.ffn_hidden_size, e.activation, e.linear_bias, e.init_std) == (16, 32, "swiglu", True, 0.1)
    assert (d.dispatch, d.overlap_chunks) == ("hierarchical", 2)


def test_frozen() -> None:
    cfg = LargeEPConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        LargeEPConfig(16, 32, 4)  # type: ignore[misc]  # keyword-only


def test_from_dict_round_trip() -> None:
    cfg = LargeEPConfig(**BASE, top_k=1, capacity_factor=2.0, activation="swiglu")
    assert LargeEPConfig.from_dict(cfg.to_dict()) == cfg
    assert LargeEPConfig.from_dict(BASE) == LargeEPConfig(**BASE)


def test_from_dict_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="moe_top_k"):
        LargeEPConfig.from_dict({**BASE, "moe_top_k": 2})


def test_from_dict_missing_key_is_named() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        LargeEPConfig.from_dict({"hidden_size": 16, "ffn_hidden_size": 32})


def test_from_dict_needs_a_mapping() -> None:
    with pytest.raises(ValueError, match="list"):
        LargeEPConfig.from_dict([("hidden_size", 16)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", "16"),
        ("hidden_size", 16.0),
        ("hidden_size", True),  # a bool is not a size
        ("num_experts", None),
        ("top_k", 2.5),
        ("normalize_topk", 1),
        ("capacity_factor", "1.0"),
        ("activation", 3),
        ("aux_loss_coeff", None),
        ("linear_bias", "yes"),
        ("check_inputs", 0),
    ],
)
def test_wrong_type_is_named(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        LargeEPConfig.from_dict({**BASE, field: value})
    assert field in str(info.value) and repr(value) in str(info.value)
    with pytest.raises(ValueError, match=field):
        LargeEPConfig(**{**BASE, field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("ffn_hidden_size", -1),
        ("num_experts", 0),
        ("top_k", 0),
        ("top_k", 5),  # > num_experts = 4
        ("activation", "relu"),
        ("score_function", "softplus"),
        ("dispatch", "ring"),
        ("capacity_factor", 0.0),
        ("capacity_factor", float("nan")),
        ("capacity_factor", float("inf")),
        ("bias_update_rate", -1e-3),
        ("aux_loss_coeff", float("nan")),
        ("z_loss_coeff", -0.1),
        ("init_std", 0.0),
        ("overlap_chunks", 0),
    ],
)
def test_impossible_value_is_named(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        LargeEPConfig.from_dict({**BASE, field: value})
    assert field in str(info.value) and str(value) in str(info.value)


def test_top_k_above_num_experts_names_both() -> None:
    with pytest.raises(ValueError) as info:
        LargeEPConfig(**{**BASE, "top_k": 5})
    assert "top_k=5" in str(info.value) and "num_experts=4" in str(info.value)


def test_accepted_edge_values() -> None:
    # An int where a float is expected is fine; top_k may equal num_experts; zero coefficients are "off".
    cfg = LargeEPConfig(**BASE, capacity_factor=1, top_k=4, bias_update_rate=0, init_std=1)
    assert cfg.capacity_factor == 1 and cfg.top_k == 4


def test_replace_validates() -> None:
    cfg = LargeEPConfig(**BASE)
    assert cfg.replace(top_k=1).top_k == 1
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=9)


def test_numpy_numbers_are_accepted_as_python_numbers() -> None:
    np = pytest.importorskip("numpy")  # the core never imports numpy; users' numbers often are numpy's
    cfg = LargeEPConfig(hidden_size=np.int64(16), ffn_hidden_size=np.int32(32), num_experts=np.int64(4),
                        top_k=np.uint8(2), capacity_factor=np.float32(1.5), bias_update_rate=np.float64(1e-3))
    assert cfg == LargeEPConfig(**BASE, top_k=2, capacity_factor=1.5, bias_update_rate=1e-3)
    assert type(cfg.num_experts) is int and type(cfg.capacity_factor) is float and type(cfg.bias_update_rate) is float
    with pytest.raises(ValueError, match="num_experts=np.True_ has the wrong type"):
        LargeEPConfig(**{**BASE, "num_experts": np.bool_(True)})
    with pytest.raises(ValueError, match="hidden_size=np.float64.*wrong type"):
        LargeEPConfig(**{**BASE, "hidden_size": np.float64(16)})
