"""The "large_ep" section of a DeepSpeed config is read strictly, and the shipped ds_configs are valid for both
the plugin and DeepSpeed itself."""
from __future__ import annotations

import glob
import json
import os

import pytest

from largeep_plugin.integrations.section.config import (
    LargeEPSection,
    layer_fields,
    large_ep_section_from_config,
    parse_large_ep_section,
    resolve_ep_size,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_section_parses_every_field():
    s = parse_large_ep_section({
        "enabled": True, "ep_size": 8, "top_k": 1, "score_function": "sigmoid", "capacity_factor": 1.25,
        "placement": {"topology_file": "t.yaml", "load_file": "load.json"},
        "overlap": {"chunks": 4, "dispatch": "hierarchical"},
        "load_balance": {"bias_update_rate": 0.01, "aux_loss_coeff": 1e-3, "z_loss_coeff": 1e-4},
        "monitor": {"jsonl_path": "x.jsonl", "tensorboard_dir": None},
    })
    assert (s.enabled, s.ep_size, s.top_k, s.score_function, s.capacity_factor) == (True, 8, 1, "sigmoid", 1.25)
    assert (s.placement.topology_file, s.placement.load_file) == ("t.yaml", "load.json")
    assert (s.overlap.chunks, s.overlap.dispatch) == (4, "hierarchical")
    assert (s.load_balance.bias_update_rate, s.load_balance.aux_loss_coeff) == (0.01, 1e-3)
    assert s.monitor.jsonl_path == "x.jsonl" and s.group_name == "ep_size_8"


def test_missing_section_is_disabled():
    assert parse_large_ep_section(None) == LargeEPSection()
    assert not large_ep_section_from_config({"train_batch_size": 8}).enabled
    # Disabled needs no EP size, but is still checked.
    assert not parse_large_ep_section({"enabled": False}).enabled


@pytest.mark.parametrize("section, named, listed", [
    ({"enabled": True, "ep_size": 4, "ep_sise": 4}, "ep_sise", "'ep_size'"),
    ({"enabled": True, "ep_size": 4, "overlap": {"chunk": 2}}, "chunk", "'chunks'"),
    ({"enabled": False, "load_balance": {"bias_rate": 0.1}}, "bias_rate", "'bias_update_rate'"),
    ({"enabled": True, "ep_size": 4, "monitor": {"tensorboard": "d"}}, "tensorboard", "'tensorboard_dir'"),
])
def test_misspelt_key_is_named_with_the_valid_list(section, named, listed):
    with pytest.raises(ValueError) as exc:
        parse_large_ep_section(section)
    msg = str(exc.value)
    assert f"'{named}'" in msg and "valid keys" in msg and listed in msg


@pytest.mark.parametrize("section, path, value", [
    ({"enabled": "yes", "ep_size": 4}, "large_ep.enabled", "'yes'"),
    ({"enabled": True, "ep_size": "16"}, "large_ep.ep_size", "'16'"),
    ({"enabled": True, "ep_size": "autox"}, "large_ep.ep_size", "'autox'"),
    ({"enabled": True, "ep_size": "AUTO"}, "large_ep.ep_size", "'AUTO'"),
    ({"enabled": True, "ep_size": "auto", "data_parallel_copies": "2"}, "large_ep.data_parallel_copies", "'2'"),
    ({"enabled": True, "ep_size": 4.0}, "large_ep.ep_size", "4.0"),
    ({"enabled": True, "ep_size": True}, "large_ep.ep_size", "True"),
    ({"enabled": True, "ep_size": 4, "capacity_factor": True}, "large_ep.capacity_factor", "True"),
    ({"enabled": True, "ep_size": 4, "overlap": {"chunks": None}}, "large_ep.overlap.chunks", "None"),
    ({"enabled": True, "ep_size": 4, "overlap": []}, "large_ep.overlap", "[]"),
])
def test_wrong_type_names_the_key_and_value(section, path, value):
    with pytest.raises(ValueError) as exc:
        parse_large_ep_section(section)
    assert f"{path}={value} has the wrong type" in str(exc.value)


@pytest.mark.parametrize("section, fragment", [
    ({"enabled": True}, "large_ep.ep_size is not set"),
    ({"enabled": True, "ep_size": 0}, "large_ep.ep_size=0 must be >= 1, or \"auto\""),
    ({"enabled": True, "ep_size": -4}, "large_ep.ep_size=-4"),
    ({"enabled": True, "ep_size": "auto", "data_parallel_copies": 0}, "large_ep.data_parallel_copies=0"),
    ({"enabled": True, "ep_size": 4, "score_function": "relu"}, "large_ep.score_function='relu'"),
    ({"enabled": True, "ep_size": 4, "capacity_factor": -1}, "large_ep.capacity_factor=-1"),
    ({"enabled": True, "ep_size": 4, "overlap": {"dispatch": "ring"}}, "large_ep.overlap.dispatch='ring'"),
    ({"enabled": True, "ep_size": 4, "load_balance": {"aux_loss_coeff": -0.1}}, "aux_loss_coeff=-0.1"),
])
def test_impossible_values(section, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        parse_large_ep_section(section)


def test_moves_are_layer_fields_and_checked():
    section = parse_large_ep_section({"enabled": True, "ep_size": 4, "replace_every": 3, "replace_margin": 0.1})
    assert layer_fields(section)["replace_every"] == 3 and layer_fields(section)["replace_margin"] == 0.1
    assert parse_large_ep_section({"enabled": True, "ep_size": 4}).replace_every == 0
    with pytest.raises(ValueError, match=r"large_ep\.replace_every=-1 must be >= 0"):
        parse_large_ep_section({"enabled": True, "ep_size": 4, "replace_every": -1})
    with pytest.raises(ValueError, match=r"large_ep\.replace_margin=-0\.5 must be a finite number >= 0"):
        parse_large_ep_section({"enabled": True, "ep_size": 4, "replace_margin": -0.5})


def test_shipped_configs():
    paths = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
    names = [os.path.basename(p) for p in paths]
    assert {"stock_moe_cpu.json", "large_ep_cpu.json", "large_ep_16xh100.json"} <= set(names)
    for path in paths:
        section = large_ep_section_from_config(path)
        assert section.enabled == ("large_ep" in os.path.basename(path)), path
        with open(path) as f:
            raw = json.load(f)
        assert "expert_parallel" not in raw  # that key would switch on DeepSpeed's own AutoEP
    cpu = large_ep_section_from_config(os.path.join(ROOT, "ds_configs", "large_ep_cpu.json"))
    # One config for any world: the README runs it at 4 processes, the demo's size is 16.
    assert cpu.ep_size == "auto" and [resolve_ep_size(cpu, w) for w in (4, 16)] == [4, 16]


@pytest.mark.parametrize("section, world, experts, ep", [
    ({"ep_size": "auto"}, 4, None, 4),                              # experts follow the EP size: the whole world
    ({"ep_size": "auto"}, 16, None, 16),
    ({"ep_size": "auto"}, 8, 4, 4),                                 # one expert per rank, 2 data-parallel copies
    ({"ep_size": "auto", "data_parallel_copies": 2}, 8, None, 4),   # the copies asked for decide
    ({"ep_size": "auto", "data_parallel_copies": 1}, 4, 4, 4),
    ({"ep_size": 4}, 8, 4, 4),
    ({"ep_size": 4, "data_parallel_copies": 2}, 8, None, 4),
])
def test_ep_size_resolves_against_the_world(section, world, experts, ep):
    assert resolve_ep_size(parse_large_ep_section({"enabled": True, **section}), world, experts) == ep


@pytest.mark.parametrize("section, world, experts, message", [
    ({"ep_size": 16}, 4, None, "large_ep.ep_size=16 must divide the world size 4"),
    ({"ep_size": 3}, 4, 3, "large_ep.ep_size=3 must divide the world size 4"),
    ({"ep_size": "auto"}, 6, 4, "large_ep.ep_size='auto': the world size 6 is not a multiple of the 4 experts"),
    ({"ep_size": "auto"}, 2, 4, "large_ep.ep_size='auto': the world size 2 is not a multiple of the 4 experts"),
    ({"ep_size": "auto", "data_parallel_copies": 3}, 4, None, "large_ep.data_parallel_copies=3 must divide the world"),
    ({"ep_size": 4, "data_parallel_copies": 2}, 4, None,
     "large_ep.data_parallel_copies=2 with large_ep.ep_size=4 needs a world of 8 ranks, not 4"),
])
def test_ep_size_the_world_cannot_hold_names_the_field(section, world, experts, message):
    with pytest.raises(ValueError) as exc:
        resolve_ep_size(parse_large_ep_section({"enabled": True, **section}), world, experts)
    assert str(exc.value).startswith(message), str(exc.value)


def test_unresolved_auto_has_no_group_name():
    with pytest.raises(ValueError, match="large_ep.ep_size='auto' is not resolved yet"):
        parse_large_ep_section({"enabled": True, "ep_size": "auto"}).group_name


def test_deepspeed_accepts_the_shipped_configs():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    for path in sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))):
        with open(path) as f:
            raw = json.load(f)
        parsed = DeepSpeedConfig(raw)
        assert parsed._param_dict.get("large_ep") == raw.get("large_ep")  # kept in the raw dict, as relied on
