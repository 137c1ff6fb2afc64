"""torchtitan 0.3.0: its MoE block with the large-EP override equals torchtitan's own block at EP 4, and checkpoints
move between runs with and without the override.

Shape legend:  B batch   L sequence   D hidden size   E experts   e experts of one EP rank   F expert ffn size

The reference is torchtitan's own ``MoE`` parallelised by torchtitan on its EP mesh (``AllToAllTokenDispatcher``
over gloo, experts ``Shard(0)``), fed the same tokens; the override is switched on the way a run does it, through
torchtitan's ``apply_overrides`` with the flag's target. Two registry flavours (integrations/torchtitan/tiny.py).
"""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from conftest import rel_err, world

torchtitan = pytest.importorskip("torchtitan", reason="torchtitan is installed by scripts/setup.sh")

from torchtitan.config.override import OverrideConfig, apply_overrides  # noqa: E402

from largeep_plugin.integrations.torchtitan.tiny import FLAVOURS, moe_configs, set_ep_sharding, tiny_model_config  # noqa: E402

TARGET = "largeep_plugin.integrations.torchtitan.override.large_ep"
EP = 4
TOL = 1e-5


def _model_config(flavour: str, **override_kwargs):
    """(torchtitan's model config, the same with the override applied), sharding configs set for EP 4."""
    cfg = set_ep_sharding(tiny_model_config(flavour))
    ours = copy.deepcopy(cfg)
    apply_overrides(OverrideConfig(imports=[(TARGET, override_kwargs)] if override_kwargs else [TARGET]), ours)
    return cfg, ours


def _block_parity(rank: int, world_size: int, dynamic: bool = False) -> dict[str, float]:
    """Errors of the override's block against torchtitan's own; ``dynamic``: with ``dynamic_replicas=1``, compared
    on a second forward and backward, after ``largeep_plugin.rebalance`` planned clones from the first's load."""
    import largeep_plugin as lep
    from largeep_plugin.integrations.torchtitan.cpu import cpu_parallel_dims

    dims = cpu_parallel_dims(ep=EP)
    errors: dict[str, float] = {}
    for flavour in FLAVOURS:
        kwargs = {"dynamic_replicas": 1, "rebalance_decay": 0.0} if dynamic else {}
        theirs_cfg, ours_cfg = _model_config(flavour, **kwargs)
        titan_cfg, large_cfg = moe_configs(theirs_cfg)[-1], moe_configs(ours_cfg)[-1]
        torch.manual_seed(0)  # the same weights on every rank
        full = titan_cfg.build()
        full.init_states()
        with torch.no_grad():
            full.expert_bias_E.copy_(torch.randn(full.expert_bias_E.shape) * 0.02)  # a selection bias in play
        theirs = titan_cfg.build()
        theirs.load_state_dict(full.state_dict())
        theirs.parallelize(dims)
        ours = large_cfg.build()
        ours.parallelize(dims)
        ours.load_state_dict(full.state_dict())  # torchtitan's names, whole tensors
        gen = torch.Generator().manual_seed(100 + rank)
        x_BLD = torch.randn(2, 6, titan_cfg.routed_experts.inner_experts.dim, generator=gen)
        g_BLD = torch.randn(x_BLD.shape, generator=gen)
        xs = [x_BLD.clone().requires_grad_(True) for _ in range(2)]
        y_theirs, y_ours = theirs(xs[0]), ours(xs[1])
        (y_theirs * g_BLD).sum().backward()
        (y_ours * g_BLD).sum().backward()
        if dynamic:  # clones planned from that load, then the comparison on the same tokens again
            with torch.no_grad():  # a strong selection bias: expert 0 in every token's top k
                full_bias = theirs.expert_bias_E + torch.nn.functional.one_hot(torch.tensor(0), len(theirs.expert_bias_E))
                theirs.expert_bias_E.copy_(full_bias)
                ours.layer.router.expert_bias.copy_(full_bias)
            xs = [x_BLD.clone().requires_grad_(True) for _ in range(2)]
            theirs(xs[0]).sum().backward()
            ours(xs[1]).sum().backward()
            lep.rebalance(ours)
            errors[f"{flavour}.no clones"] = float(ours.layer.clones.plan.num_clones == 0)
            for module in (theirs, ours):
                module.zero_grad(set_to_none=True)
            xs = [x_BLD.clone().requires_grad_(True) for _ in range(2)]
            y_theirs, y_ours = theirs(xs[0]), ours(xs[1])
            (y_theirs * g_BLD).sum().backward()
            (y_ours * g_BLD).sum().backward()
        f = titan_cfg.routed_experts.inner_experts.hidden_dim
        inner = theirs.routed_experts.inner_experts
        local = ours.layer.local_experts()
        pairs = {
            "y": (y_ours, y_theirs), "dx": (xs[1].grad, xs[0].grad),
            "router": (ours.layer.router.weight.grad, theirs.router.gate.weight.grad),
            "w1": (torch.stack([m.fc1.weight.grad[:f] for _, m in local]), inner.w1_EFD.grad.to_local()),
            "w3": (torch.stack([m.fc1.weight.grad[f:] for _, m in local]), inner.w3_EFD.grad.to_local()),
            "w2": (torch.stack([m.fc2.weight.grad for _, m in local]), inner.w2_EDF.grad.to_local()),
            "tokens_per_expert": (ours.tokens_per_expert_E, theirs.tokens_per_expert_E),
        }
        if theirs.shared_experts is not None:
            shared = ours.layer.shared_expert
            pairs["shared"] = (torch.cat([shared.fc1.weight.grad, shared.fc2.weight.grad.t()]),
                               torch.cat([theirs.shared_experts.w1.weight.grad, theirs.shared_experts.w3.weight.grad,
                                          theirs.shared_experts.w2.weight.grad.t()]))
        for name, (got, want) in pairs.items():
            errors[f"{flavour}.{name}"] = rel_err(got, want)
            errors[f"{flavour}.{name}.scale"] = float(want.abs().max())
    return errors


@pytest.mark.parametrize("dynamic", [False, True], ids=["one expert slot", "dynamic replicas"])
def test_block_equals_torchtitans_own_at_ep4(dynamic):
    """Forward, input gradient, router, expert and shared-expert gradients and torchtitan's token counter, on every
    rank, for a Qwen3-MoE and a DeepSeek-V3 flavour (group-limited sigmoid routing, route scale, shared expert);
    also with the flag's ``dynamic_replicas=1`` once clones are planned."""
    for rank, errors in enumerate(world(_block_parity, EP, dynamic, timeout=240)):
        for name, err in errors.items():
            if name.endswith(".scale"):
                assert err > 1e-7, f"rank {rank}: {name} = {err}: the comparison would be of zeros"
            elif dynamic and name.split(".")[-1] in ("w1", "w2", "w3"):
                # The experts compute in bfloat16 (torchtitan's numerics): a hot expert's weight gradient is the sum
                # of its home's and its clones' bfloat16 GEMMs instead of one over all its rows, so it differs by
                # bfloat16 rounding (2**-8), not more.
                assert err < 2 * 2**-8, f"rank {rank}: {name} relative error {err:.3g}"
            else:
                assert err < TOL, f"rank {rank}: {name} relative error {err:.3g}"


def _checkpoint_switch(rank: int, world_size: int, folder: str) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpointer.base import ModelWrapper
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    from largeep_plugin.integrations.torchtitan.cpu import cpu_parallel_dims
    from largeep_plugin.integrations.torchtitan.moe import LargeEPTitanMoE

    dims = cpu_parallel_dims(ep=EP)
    out: dict[str, float] = {}
    for flavour in FLAVOURS:
        theirs_cfg, ours_cfg = _model_config(flavour)

        def build(cfg, seed):
            """torchtitan's trainer order: built on the meta device, EP (model.parallelize), FSDP (its decoder
            wrapping), to_empty, then init_weights."""
            with torch.device("meta"):
                model = cfg.build()
            model.parallelize(dims)
            apply_fsdp_to_decoder(model, dims.get_mesh("fsdp"), param_dtype=torch.float32,
                                  reduce_dtype=torch.float32, pp_enabled=False, ep_degree=EP,
                                  edp_mesh=dims.get_optional_mesh("efsdp"))
            model.to_empty(device="cpu")
            torch.manual_seed(seed)
            model.init_weights()
            for layer in model.layers.values():  # a trained-looking selection bias, so it travels too
                if getattr(layer, "moe_enabled", False):
                    with torch.no_grad():
                        layer.moe.expert_bias_E.add_(torch.randn(layer.moe.expert_bias_E.shape) * 0.05)
            return model.eval()

        tokens_BL = torch.randint(0, theirs_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank))
        positions_BL = torch.arange(12).repeat(2, 1)

        def logits(model):
            with torch.no_grad():
                return model(tokens_BL, positions_BL, model.get_attention_masks(positions=positions_BL))

        def save(model, name):
            dcp.save(ModelWrapper(model).state_dict(), checkpoint_id=f"{folder}/{flavour}-{name}")

        def load(model, name):
            wrapper = ModelWrapper(model)
            state = wrapper.state_dict()
            dcp.load(state, checkpoint_id=f"{folder}/{flavour}-{name}")
            wrapper.load_state_dict(state)
            return model

        with_plugin = build(ours_cfg, seed=1)
        save(with_plugin, "on")
        without = load(build(theirs_cfg, seed=2), "on")          # plugin off on resume
        out[f"{flavour}.on->off"] = rel_err(logits(without), logits(with_plugin))
        save(without, "off")
        again = load(build(ours_cfg, seed=3), "off")              # and on again
        out[f"{flavour}.off->on"] = rel_err(logits(again), logits(without))
        out[f"{flavour}.fresh"] = rel_err(logits(build(ours_cfg, seed=4)), logits(with_plugin))  # not trivially equal
        out[f"{flavour}.same keys"] = float(set(ModelWrapper(again).state_dict()) ==
                                            set(ModelWrapper(without).state_dict()))
        # FSDP as torchtitan's own EP: expert parameters on the expert mesh (efsdp), the rest on the dense one.
        moe = next(m for m in again.modules() if isinstance(m, LargeEPTitanMoE))
        expert_meshes = {p.device_mesh.mesh_dim_names for p in moe.routed_experts.inner_experts.parameters()}
        out[f"{flavour}.experts on efsdp"] = float(expert_meshes == {("efsdp",)})
        out[f"{flavour}.router on fsdp"] = float(moe.layer.router.weight.device_mesh.mesh_dim_names == ("fsdp",))
    return out


def test_checkpoint_moves_between_runs_with_and_without_the_override(tmp_path):
    """DCP, torchtitan's ModelWrapper and FSDP as torchtitan wraps a decoder: a checkpoint written with the
    override loads into a run without it (and back) and gives the same logits."""
    for rank, out in enumerate(world(_checkpoint_switch, EP, str(tmp_path), timeout=300)):
        for name, value in out.items():
            if name.endswith("fresh"):
                assert value > 1e-3, f"rank {rank}: {name}: differently seeded models should differ"
            elif name.endswith(("keys", "efsdp", "fsdp")):
                assert value == 1.0, f"rank {rank}: {name} does not hold"
            else:
                assert value < TOL, f"rank {rank}: {name} logits differ by {value:.3g}"


# ---- what is refused ---------------------------------------------------------------------------------------------
def _moe(flavour: str = "qwen3"):
    return moe_configs(tiny_model_config(flavour))[-1]


def test_the_flag_carries_plugin_only_fields():
    from largeep_plugin.integrations.torchtitan.moe import LargeEPTitanMoE

    _, ours = _model_config("deepseek_v3", overlap_chunks=2, capacity_factor=1.5)
    moe = moe_configs(ours)[-1]
    assert type(moe) is LargeEPTitanMoE.Config
    built = moe.build()
    c = built.largeep_config
    assert (c.overlap_chunks, c.capacity_factor, c.num_groups, c.group_topk, c.routed_scaling_factor) == (2, 1.5, 4, 2, 2.5)
    assert (c.score_function, c.top_k, c.shared_ffn_hidden_size, c.bias_update_rate) == ("sigmoid", 3, 24, 1e-3)
    assert built.load_balance_coeff == 1e-3 and built.expert_bias_E is None  # no layer before parallelize


@pytest.mark.parametrize("change, fields, error, words", [
    (None, {"top_k": 4}, ValueError, "top_k=4 is defined by the model"),
    (None, {"bias_rate": 1.0}, ValueError, "unknown override bias_rate"),
    (lambda c: dataclasses.replace(c, router=dataclasses.replace(c.router, _debug_force_load_balance=True)), {},
     NotImplementedError, "_debug_force_load_balance"),
    (lambda c: _with_dispatcher(c, "deepep"), {}, NotImplementedError, "DeepEPTokenDispatcher"),
    (lambda c: _with_dispatcher(c, "hybridep"), {}, NotImplementedError, "HybridEPTokenDispatcher"),
    (lambda c: _with_shared_bias(c), {}, NotImplementedError, "shared_experts.w1.bias=True"),
])
def test_unsupported_settings_are_named(change, fields, error, words):
    """Refused when the override is applied (before anything is built), naming the setting."""
    from largeep_plugin.integrations.torchtitan.override import large_ep

    cfg = _moe("deepseek_v3")
    with pytest.raises(error, match=words):
        large_ep(change(cfg) if change else cfg, **fields)


def _with_dispatcher(cfg, backend: str):
    from torchtitan.models.common.config_utils import make_token_dispatcher_config

    dispatcher = make_token_dispatcher_config(num_experts=cfg.num_experts, top_k=cfg.router.top_k,
                                              comm_backend=backend, hidden_dim=cfg.routed_experts.inner_experts.dim)
    return dataclasses.replace(cfg, routed_experts=dataclasses.replace(cfg.routed_experts, token_dispatcher=dispatcher))


def _with_shared_bias(cfg):
    shared = cfg.shared_experts
    return dataclasses.replace(cfg, shared_experts=dataclasses.replace(shared, w1=dataclasses.replace(shared.w1, bias=True)))


def test_gpt_oss_experts_are_refused():
    from torchtitan.models.gpt_oss import model_registry

    from largeep_plugin.integrations.torchtitan.override import large_ep

    cfg = moe_configs(model_registry("debugmodel", attn_backend="flex").model)[0]
    with pytest.raises(NotImplementedError, match="GptOssGroupedExperts"):
        large_ep(cfg)


@pytest.mark.parametrize("dims, error, words", [
    (dict(ep=1), ValueError, "expert_parallel_degree=1"),
    (dict(tp=2), NotImplementedError, "tensor_parallel_degree=2"),
    (dict(spmd_backend="full_dtensor"), NotImplementedError, "full_dtensor"),
])
def test_parallel_settings_are_named(dims, error, words):
    from largeep_plugin.integrations.torchtitan.override import large_ep

    fields = dict(spmd_backend="partial_dtensor", tp=1, ep=4)
    fields.update(dims)
    parallel_dims = SimpleNamespace(**fields, tp_enabled=fields["tp"] > 1,
                                    get_optional_mesh=lambda name: None)
    moe = large_ep(_moe()).build()
    with pytest.raises(error, match=words):
        moe.parallelize(parallel_dims)
    with pytest.raises(ValueError, match="expert_parallel_degree > 1"):
        moe(torch.zeros(1, 2, 32))
