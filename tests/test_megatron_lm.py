"""The Megatron-LM route without Megatron-LM (it is not installable here): the extra arguments, where the settings
come from (``--large-ep-config``, the ``large_ep`` section of a DeepSpeed JSON), the placement planned from the
section's files, the GPT builder (off: Megatron-LM's
builder unchanged; on: large-EP layers plus the bias/load hook after each optimizer step), and the entry script
``examples/megatron_lm/pretrain_gpt_largeep.py`` run against stand-ins of the Megatron-LM modules it imports, with
the signatures Megatron-LM core_r0.16 documents (``pretrain(..., extra_args_provider=...)``,
``model_provider(builder, pre_process, post_process, vp_stage, config, pg_collection)``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")

import torch  # noqa: E402

from conftest import world  # noqa: E402
from megatron_helpers import init_megatron, tiny_config  # noqa: E402

from largeep_plugin.integrations.megatron.lm import (  # noqa: E402
    add_large_ep_args, large_ep_gpt_builder, large_ep_settings, read_deepspeed_large_ep_section,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY_4X4 = os.path.join(REPO, "examples", "topologies", "4x4.yaml")
TOPOLOGY_2X2 = """
name: 2x2
nodes: 2
gpus_per_node: 2
gpu_memory_gib: 80
intra_node: {bandwidth_gbytes_per_s: 300, latency_us: 2}
inter_node: {bandwidth_gbytes_per_s: 100, latency_us: 5}
"""


def lm_args(**overrides: Any) -> SimpleNamespace:
    """The Megatron-LM arguments the builder reads, at Megatron-LM's defaults."""
    fields: dict[str, Any] = dict(
        large_ep=False, large_ep_config=None, large_ep_monitor=None, deepspeed_config=None, num_experts=2,
        use_legacy_models=False, spec=None, mtp_num_layers=None, experimental_attention_variant=None,
        heterogeneous_layers_config_path=None, transformer_impl="local", normalization="LayerNorm", qk_l2_norm=False,
        padded_vocab_size=32, max_position_embeddings=8, fp16_lm_cross_entropy=False,
        untie_embeddings_and_output_weights=False, position_embedding_type="learned_absolute", rotary_percent=1.0,
        rotary_base=10000, use_rope_scaling=False, moe_router_topk=2, expert_model_parallel_size=1,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def write_json(path: Any, data: Any) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_extra_args_are_added_and_parsed() -> None:
    parser = add_large_ep_args(argparse.ArgumentParser())
    args = parser.parse_args(["--large-ep", "--large-ep-config", "c.yaml", "--deepspeed_config", "ds.json",
                              "--large-ep-monitor", "load.jsonl"])
    assert (args.large_ep, args.large_ep_config, args.deepspeed_config, args.large_ep_monitor) == (
        True, "c.yaml", "ds.json", "load.jsonl")
    defaults = parser.parse_args([])
    assert (defaults.large_ep, defaults.large_ep_config, defaults.deepspeed_config) == (False, None, None)
    # Megatron-DeepSpeed defines --deepspeed_config itself: no second definition (argparse would refuse it).
    ds_parser = argparse.ArgumentParser()
    ds_parser.add_argument("--deepspeed_config")
    assert add_large_ep_args(ds_parser).parse_args(["--deepspeed_config", "x.json"]).deepspeed_config == "x.json"


def test_deepspeed_section_is_read_strictly(tmp_path: Any) -> None:
    section = {"enabled": True, "ep_size": 4, "top_k": 2, "load_balance": {"bias_update_rate": 0.01},
               "overlap": {"chunks": 1}, "monitor": {"jsonl_path": "load.jsonl"}}
    good = write_json(tmp_path / "ds.json", {"train_batch_size": 8, "large_ep": section})
    settings = large_ep_settings(lm_args(deepspeed_config=good))
    assert settings.enabled and settings.ep_size == 4 and settings.monitor == "load.jsonl"
    # Only what the section writes becomes an override: its defaults (score_function ...) never do.
    assert dict(settings.overrides) == {"top_k": 2, "bias_update_rate": 0.01, "overlap_chunks": 1}
    none = write_json(tmp_path / "plain.json", {"train_batch_size": 8})
    assert read_deepspeed_large_ep_section(none) is None
    assert not large_ep_settings(lm_args(deepspeed_config=none)).enabled
    typo = write_json(tmp_path / "typo.json", {"large_ep": {"enabled": True, "ep_size": 2, "bias_rate": 0.01}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bias_rate'\]; valid keys are"):
        large_ep_settings(lm_args(deepspeed_config=typo))
    flag = write_json(tmp_path / "flag.json", {"large_ep": {"enabled": "yes"}})
    with pytest.raises(ValueError, match="large_ep.enabled='yes' has the wrong type"):
        large_ep_settings(lm_args(deepspeed_config=flag))
    # "auto" leaves the EP size to --expert-model-parallel-size; the copies are Megatron's to derive.
    auto = write_json(tmp_path / "auto.json", {"large_ep": {"enabled": True, "ep_size": "auto"}})
    assert large_ep_settings(lm_args(deepspeed_config=auto)).ep_size is None
    copies = write_json(tmp_path / "copies.json", {"large_ep": {"enabled": True, "ep_size": "auto",
                                                                "data_parallel_copies": 2}})
    with pytest.raises(ValueError, match="large_ep.data_parallel_copies=2: under Megatron-LM"):
        large_ep_settings(lm_args(deepspeed_config=copies))
    moves = write_json(tmp_path / "moves.json", {"large_ep": {"enabled": True, "ep_size": 2, "replace_every": 3}})
    with pytest.raises(NotImplementedError, match="large_ep.replace_every=3: moving home experts is not supported on "
                                                  "the Megatron-LM route"):
        large_ep_settings(lm_args(deepspeed_config=moves))


def test_settings_conflicts_are_errors(tmp_path: Any) -> None:
    yaml_file = tmp_path / "large_ep.yaml"
    yaml_file.write_text("load_balance:\n  bias_update_rate: 0.002\n")
    settings = large_ep_settings(lm_args(large_ep=True, large_ep_config=str(yaml_file)))
    assert settings.enabled and dict(settings.overrides) == {"bias_update_rate": 0.002}
    off = write_json(tmp_path / "off.json", {"large_ep": {"enabled": False}})
    with pytest.raises(ValueError, match="--large-ep is given but the large_ep section says enabled=false"):
        large_ep_settings(lm_args(large_ep=True, deepspeed_config=off))
    on = write_json(tmp_path / "on.json", {"large_ep": {"enabled": True, "ep_size": 2}})
    with pytest.raises(ValueError, match="give one of them"):
        large_ep_settings(lm_args(deepspeed_config=on, large_ep_config=str(yaml_file)))
    with pytest.raises(ValueError, match="the large-EP layer is off: add --large-ep"):
        large_ep_settings(lm_args(large_ep_config=str(yaml_file)))
    with pytest.raises(ValueError, match="no such file"):
        large_ep_settings(lm_args(large_ep=True, large_ep_config=str(tmp_path / "missing.json")))
    monitored = write_json(tmp_path / "mon.json", {"large_ep": {"enabled": True, "ep_size": 2,
                                                                 "monitor": {"jsonl_path": "b.jsonl"}}})
    with pytest.raises(ValueError, match="differ: give one of them"):
        large_ep_settings(lm_args(deepspeed_config=monitored, large_ep_monitor="a.jsonl"))


def test_placement_is_planned_from_the_section_files(tmp_path: Any) -> None:
    from largeep_plugin.integrations.section.config import parse_large_ep_section
    from largeep_plugin.integrations.section.placement import plan_section_placement

    hot = (0, 4, 8, 12)
    load = write_json(tmp_path / "load.json", {"tokens_per_expert": [100 if e in hot else 1 for e in range(16)]})
    section = {"enabled": True, "ep_size": 16, "placement": {"topology_file": TOPOLOGY_4X4, "load_file": load}}
    args = lm_args(deepspeed_config=write_json(tmp_path / "ds.json", {"large_ep": section}), num_experts=16,
                   expert_model_parallel_size=16, moe_router_topk=2)
    settings = large_ep_settings(args)
    placement = settings.placement
    assert settings.enabled and dict(settings.overrides) == {}  # the files are not LargeEPConfig overrides
    # The DeepSpeed adapter's planner on the same files and shape: the same plan.
    assert placement.rank_to_experts == plan_section_placement(parse_large_ep_section(section), 16, 2).rank_to_experts
    assert sorted(placement.rank_to_expert) == list(range(16))  # one expert per EP rank
    # Load-aware: the four hot experts (all on node 0 when expert e sits on rank e) go to four different nodes.
    assert sorted(placement.topology.node_of(placement.rank_to_expert.index(e)) for e in hot) == [0, 1, 2, 3]
    # Planned once per process: another model chunk (another builder call) gets the same plan object.
    assert large_ep_settings(args).placement is placement
    # The same section from a YAML --large-ep-config, without a load file; no files: no placement.
    yaml_file = tmp_path / "large_ep.yaml"
    yaml_file.write_text(f"placement:\n  topology_file: {TOPOLOGY_4X4}\n")
    uniform = large_ep_settings(lm_args(large_ep=True, large_ep_config=str(yaml_file), num_experts=16,
                                        expert_model_parallel_size=16)).placement
    assert uniform.num_experts == 16 and uniform.world_size == 16
    assert large_ep_settings(lm_args(large_ep=True, num_experts=16, expert_model_parallel_size=16)).placement is None


def test_placement_errors_name_the_field(tmp_path: Any) -> None:
    bad_topology = tmp_path / "bad.yaml"
    bad_topology.write_text("name: bad\nnodes: 2\n")
    short_load = write_json(tmp_path / "short.json", [1, 2, 3])
    topo = {"topology_file": TOPOLOGY_4X4}
    cases = [  # (placement section, Megatron-LM arguments, error type, message pattern)
        (topo, dict(expert_model_parallel_size=8, num_experts=8), ValueError,
         re.escape(f"large_ep.placement.topology_file={TOPOLOGY_4X4!r} describes 16 GPUs but "
                   "--expert-model-parallel-size is 8")),
        (topo, dict(expert_model_parallel_size=16, num_experts=8), NotImplementedError,
         "describes 16 GPUs for --num-experts 8, which replicates experts: .* Megatron's DDP does not do"),
        (topo, dict(expert_model_parallel_size=16, num_experts=32), NotImplementedError,
         "describes 16 GPUs for --num-experts 32: several experts per GPU are not planned"),
        (topo, dict(expert_model_parallel_size=16, num_experts=None), ValueError,
         "large_ep.placement.topology_file=.* but --num-experts is not set"),
        ({"topology_file": str(tmp_path / "missing.yaml")}, {}, ValueError,
         "large_ep.placement.topology_file=.*missing.yaml' cannot be read"),
        ({"topology_file": str(bad_topology)}, {}, ValueError, "large_ep.placement.topology_file=.*bad.yaml' cannot"),
        (dict(topo, load_file=short_load), {}, ValueError,
         "large_ep.placement.load_file=.*short.json' has 3 entries but the MoE layers have 16 experts"),
        ({"load_file": short_load}, {}, ValueError,
         "large_ep.placement.load_file=.* needs large_ep.placement.topology_file"),
        ({"topology_file": 16}, {}, ValueError, "large_ep.placement.topology_file=16 has the wrong type"),
    ]
    for i, (placement, overrides, error, pattern) in enumerate(cases):
        path = write_json(tmp_path / f"case{i}.json", {"placement": placement})
        args = lm_args(large_ep=True, large_ep_config=path, **{"num_experts": 16, "expert_model_parallel_size": 16,
                                                               **overrides})
        with pytest.raises(error, match=pattern):
            large_ep_settings(args)


def test_builder_off_calls_megatron_lm_builder_unchanged() -> None:
    calls = []

    def stock(*args: Any, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        return "stock model"

    args = lm_args()
    assert large_ep_gpt_builder(stock)(args, True, False, 1, config="cfg", pg_collection="pgs") == "stock model"
    assert calls == [((args, True, False, 1), {"config": "cfg", "pg_collection": "pgs"})]
    with pytest.raises(NotImplementedError, match="--spec"):
        large_ep_gpt_builder(stock)(lm_args(large_ep=True, spec=["m", "f"]))
    with pytest.raises(ValueError, match="needs --num-experts"):
        large_ep_gpt_builder(stock)(lm_args(large_ep=True, num_experts=None))


def _builder_rank(rank: int, world_size: int, monitor: str, ds_dir: str) -> dict[str, Any]:
    from largeep_plugin.integrations.megatron import LargeEPMoELayer, large_ep_moe_layers

    init_megatron(ep=4)
    # Top-1 (top-2 would balance a small world too easily); Megatron wants the softmax first with top-1.
    cfg = tiny_config(num_layers=2, moe_router_topk=1, moe_router_pre_softmax=True)
    shape = dict(num_experts=4, expert_model_parallel_size=4, moe_router_topk=1)
    build = large_ep_gpt_builder(lambda *a, **k: None)
    errors = {}
    for name, file, args in (
        ("ep_size", "ep_size.json", lm_args(**shape)),
        ("ep_auto", "ep_auto.json", lm_args(**shape)),
        ("top_k", "top_k.json", lm_args(**shape)),
        # a plan for 2 experts on 2 EP ranks, while the config Megatron-LM hands over has 4 and 4
        ("placement", "placed_2.json", lm_args(large_ep=True, num_experts=2, expert_model_parallel_size=2,
                                                moe_router_topk=1)),
    ):
        args.deepspeed_config = os.path.join(ds_dir, file)
        try:
            build(args, True, True, None, config=cfg)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    args = lm_args(large_ep=True, large_ep_monitor=monitor, padded_vocab_size=32, **shape)
    model = build(args, True, True, None, config=cfg)
    layers = dict(large_ep_moe_layers(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    before = {name: layer.router.expert_bias.clone() for name, layer in layers.items()}
    x = torch.randn(6, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    for name, layer in layers.items():  # the MoE layers alone: Megatron-LM's stock attention needs CUDA
        layer(x)[0].square().sum().backward()
    optimizer.step()

    # The placement planned from the section's files, on every rank without communicating, in every layer.
    placed_args = lm_args(large_ep=True, deepspeed_config=os.path.join(ds_dir, "placed.json"), **shape)
    placement = large_ep_settings(placed_args).placement
    placed = dict(large_ep_moe_layers(build(placed_args, True, True, None, config=cfg)))
    for layer in placed.values():  # runs forward and backward with the permutation
        layer(x)[0].square().sum().backward()
    return {
        "errors": errors,
        "types": [type(layer).__name__ for layer in layers.values()],
        "all_large_ep": all(isinstance(layer, LargeEPMoELayer) for layer in layers.values()),
        "bias_moved": {name: float((layers[name].router.expert_bias - b).abs().max()) for name, b in before.items()},
        "plan": placement.rank_to_experts,
        "ep_rank": [layer.ep_rank for layer in placed.values()],
        "expert_ids": [layer.expert_ids for layer in placed.values()],
        "layer_plan": [layer.placement.rank_to_experts for layer in placed.values()],
        "dispatcher_plan": [layer.token_dispatcher.placement.rank_to_experts for layer in placed.values()],
        "expert_grads": [layer.experts.expert.fc1.weight.grad is not None for layer in placed.values()],
    }


def test_builder_on_builds_large_ep_layers_and_installs_the_hook(tmp_path: Any) -> None:
    from largeep_plugin.integrations.section.placement import plan_section_placement
    from largeep_plugin.integrations.section.config import parse_large_ep_section
    from largeep_plugin.layer.load_balance import read_monitor

    (tmp_path / "2x2.yaml").write_text(TOPOLOGY_2X2)
    (tmp_path / "1x2.yaml").write_text(TOPOLOGY_2X2.replace("nodes: 2", "nodes: 1"))
    # Experts 0 and 1 hot: a topology-aware plan puts them on different nodes (not the identity's node 0).
    load = write_json(tmp_path / "load.json", [10, 9, 1, 1])
    placed = {"enabled": True, "ep_size": 4,
              "placement": {"topology_file": str(tmp_path / "2x2.yaml"), "load_file": load}}
    for name, section in (("ep_size", {"enabled": True, "ep_size": 2}),
                          ("ep_auto", {"enabled": True, "ep_size": "auto"}),  # takes Megatron's EP size
                          ("top_k", {"enabled": True, "ep_size": 4, "top_k": 2}),
                          ("placed", placed),
                          ("placed_2", {"placement": {"topology_file": str(tmp_path / "1x2.yaml")}})):
        write_json(tmp_path / f"{name}.json", {"large_ep": section})
    monitor = str(tmp_path / "load.jsonl")
    results = world(_builder_rank, 4, monitor, str(tmp_path), timeout=180)
    expected = plan_section_placement(parse_large_ep_section(placed), 4, 1).rank_to_experts
    assert expected != ((0,), (1,), (2,), (3,)), expected  # else the checks below could not tell
    for r in results:
        assert "large_ep.ep_size=2 contradicts --expert-model-parallel-size 4" in r["errors"]["ep_size"], r
        assert r["errors"]["ep_auto"] == "no error", r
        assert "top_k=2 contradicts the Megatron config (moe_router_topk gives 1)" in r["errors"]["top_k"], r
        assert "placement plan is for 2 experts on 2 EP ranks but the Megatron config has num_moe_experts=4" in (
            r["errors"]["placement"]), r
        assert r["types"] == ["LargeEPMoELayer", "LargeEPMoELayer"] and r["all_large_ep"]
        assert all(v > 0 for v in r["bias_moved"].values()), r  # softmax: the plugin's hook moved the bias
        assert r["plan"] == expected, r  # every rank planned the same, as the DeepSpeed adapter does
        assert r["layer_plan"] == r["dispatcher_plan"] == [expected] * 2, r
        assert r["expert_ids"] == [expected[ep_rank] for ep_rank in r["ep_rank"]], r
        assert all(r["expert_grads"]), r
    assert sorted(rank for r in results for rank in set(r["ep_rank"])) == [0, 1, 2, 3]
    records = read_monitor(monitor)  # written by the first rank of the TP x DP x CP group only
    assert [(rec["step"], rec["layer"]) for rec in records] == [(0, "layer_1"), (0, "layer_2")]
    assert all(sum(rec["counts"]) == 4 * 6 * 2 for rec in records)  # ranks * S * B (top-1)


STUBS = {
    # Stand-ins for the Megatron-LM modules the entry imports, with Megatron-LM's signatures.
    "gpt_builders.py": """
        def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
            return "stock gpt_builder"
    """,
    "model_provider.py": """
        from megatron.training import get_args
        def model_provider(model_builder, pre_process=True, post_process=True, vp_stage=None, config=None,
                           pg_collection=None):
            return model_builder(get_args(), pre_process, post_process, vp_stage, config=config,
                                 pg_collection=pg_collection)
    """,
    "pretrain_gpt.py": """
        def forward_step(data_iterator, model):
            raise AssertionError("not reached")
        def train_valid_test_datasets_provider(num_samples, vp_stage=None):
            raise AssertionError("not reached")
    """,
    "megatron/training/__init__.py": """
        import argparse, json, os, sys
        import torch.distributed as dist
        _ARGS = None
        def get_args():
            return _ARGS
        def pretrain(datasets_provider, model_provider, model_type, forward_step, args_defaults=None,
                     extra_args_provider=None):
            global _ARGS
            parser = argparse.ArgumentParser()
            parser.add_argument("--num-experts", type=int, default=None)
            parser.set_defaults(**json.loads(os.environ["STUB_DEFAULTS"]))  # the rest of Megatron-LM's arguments
            parser = extra_args_provider(parser)
            _ARGS = parser.parse_args()
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["STUB_PORT"])
            dist.init_process_group("gloo", rank=0, world_size=1)
            from megatron.core import parallel_state
            parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
            model = model_provider(pre_process=True, post_process=True)
            mlps = [type(l.mlp).__name__ for l in model.decoder.layers] if hasattr(model, "decoder") else model
            print("RESULT " + json.dumps({"model": mlps, "large_ep": _ARGS.large_ep}))
    """,
    "megatron/training/arguments.py": """
        def core_transformer_config_from_args(args):
            from megatron.core.transformer.transformer_config import TransformerConfig
            return TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, num_moe_experts=args.num_experts,
                                     moe_router_topk=1, moe_router_pre_softmax=True, add_bias_linear=False,
                                     use_cpu_initialization=True)
    """,
}


def _run_entry(root: Any, *argv: str) -> dict[str, Any]:
    from largeep_plugin.tools.launch import free_port

    for rel, text in STUBS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    ours = ("large_ep", "large_ep_config", "large_ep_monitor", "deepspeed_config", "num_experts")
    defaults = {k: v for k, v in vars(lm_args()).items() if k not in ours}
    env = dict(os.environ, MEGATRON_LM_ROOT=str(root), PYTHONPATH=os.pathsep.join([str(root), REPO]),
               STUB_PORT=str(free_port()), STUB_DEFAULTS=json.dumps(defaults), PYTHONWARNINGS="ignore")
    script = os.path.join(REPO, "examples", "megatron_lm", "pretrain_gpt_largeep.py")
    proc = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_megatron_lm_entry_wires_the_builder_and_the_arguments(tmp_path: Any) -> None:
    on = _run_entry(tmp_path, "--num-experts", "1", "--large-ep")
    assert on == {"model": ["LargeEPMoELayer", "LargeEPMoELayer"], "large_ep": True}
    ds = write_json(tmp_path / "ds.json", {"large_ep": {"enabled": True, "ep_size": 1}})
    assert _run_entry(tmp_path, "--num-experts", "1", "--deepspeed_config", ds)["model"] == ["LargeEPMoELayer"] * 2
    off = _run_entry(tmp_path, "--num-experts", "1")
    assert off == {"model": "stock gpt_builder", "large_ep": False}
