"""The large-EP layer inside Megatron-Core with expert tensor parallelism: EP 2 x expert-TP 2 on 4 gloo ranks
(``expert_tensor_parallel_size=2``; one world for all checks):

* each rank holds shard (its ``expt_tp`` rank) of the expert of its EP rank, and the tokens move over Megatron's
  ``tp_ep`` group;
* ``LargeEPMoELayer``'s forward and backward equal the plugin's dense reference on every rank's own tokens:
  output, input gradient, router gradient, and each expert's whole gradient reassembled from its two shards
  (summed over all ranks' tokens), for GELU/softmax/top-2 and SwiGLU/sigmoid/top-2 (Megatron refuses MoE biases
  with expert TP > 1); the reassembled weights are the reference expert's exactly;
* the distributed checkpoint of shards and colocated or replicated placements are refused, naming the value.
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
from megatron_helpers import init_megatron, placement_for, tiny_config  # noqa: E402

EP, ETP = 2, 2
TOL = 1e-5


def _whole(part: torch.Tensor | None, rows: torch.Tensor, shape: torch.Size, dim: int, group: Any) -> torch.Tensor:
    """The whole expert's tensor from the shards of the expert-TP group: shard j's ``part`` goes to ``rows`` of
    shard j along ``dim`` (fc1: its rows, fc2: its columns)."""
    parts = [torch.empty_like(part) for _ in range(ETP)]
    all_rows = [torch.empty_like(rows) for _ in range(ETP)]
    dist.all_gather(parts, part.contiguous(), group=group)
    dist.all_gather(all_rows, rows, group=group)
    whole = torch.zeros(shape, dtype=part.dtype)
    for r, p in zip(all_rows, parts):
        whole.index_copy_(dim, r, p)
    return whole


def _parity(config: Any, rank: int) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    from largeep_plugin.integrations.megatron import LargeEPMoELayer, large_ep_config_from_megatron
    from largeep_plugin.layer.reference import DenseMoEReference

    layer = LargeEPMoELayer(config, layer_number=1)
    ref = DenseMoEReference(large_ep_config_from_megatron(config))
    expert = layer.experts.expert
    ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    assert (layer.expert_id, expert.tp_rank, expert.tp_size) == (ep_rank, etp_rank, ETP), (rank, ep_rank, etp_rank)
    assert layer.token_dispatcher.dispatcher.ep_group is ps.get_expert_tensor_and_model_parallel_group()

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(5, 2, config.hidden_size, generator=gen)
    g = torch.randn(5, 2, config.hidden_size, generator=gen)
    outs = {}
    for name, model in (("ep", layer), ("ref", ref)):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y = y[0] if isinstance(y, tuple) else y
        (y * g).sum().backward()
        outs[name] = (y.detach(), xi.grad)
    errors = {"y": rel_err(outs["ep"][0], outs["ref"][0]), "dx": rel_err(outs["ep"][1], outs["ref"][1])}
    ref_router = dict(ref.router.named_parameters())
    for name, p in layer.router.named_parameters():
        if p.requires_grad:
            errors[f"router.{name}"] = rel_err(p.grad, ref_router[name].grad)

    # Expert e saw every rank's tokens: its whole gradient is the sum over ranks of the reference's.
    for each in ref.experts:  # every expert, in the same order on every rank: the all_reduces must match
        for p in each.parameters():
            dist.all_reduce(p.grad)
    want = ref.experts[layer.expert_id]
    group = ps.get_expert_tensor_parallel_group()
    rows = expert.ffn_rows()
    columns = rows[: expert.fc2.weight.shape[1]]  # the gated half's rows are fc2's columns
    for name, dim, idx in (("fc1.weight", 0, rows), ("fc2.weight", 1, columns)):
        p = expert.get_parameter(name)
        full = want.get_parameter(name)
        errors[f"expert.{name}.init"] = float((_whole(p.detach(), idx, full.shape, dim, group) - full.detach()).abs().max())
        errors[f"expert.{name}.grad"] = rel_err(_whole(p.grad, idx, full.shape, dim, group), full.grad)
        assert p.allreduce is False
    errors["scale"] = float(outs["ref"][0].abs().max())
    return errors


def _refusals() -> dict[str, str]:
    from largeep_plugin.integrations.megatron import LargeEPMoELayer

    out = {}
    layer = LargeEPMoELayer(tiny_config(), layer_number=1)
    for name, build in (
        ("checkpoint", lambda: layer.sharded_state_dict(prefix="mlp.")),
        ("colocated", lambda: LargeEPMoELayer(tiny_config(num_moe_experts=4), layer_number=1,
                                              placement=placement_for(4, EP))),
    ):
        try:
            build()
            out[name] = "no error"
        except NotImplementedError as e:
            out[name] = str(e)
    return out


def _rank(rank: int, world_size: int) -> dict[str, Any]:
    from largeep_plugin.integrations.megatron import LargeEPMoELayer

    init_megatron(ep=EP, etp=ETP)
    gelu_softmax = tiny_config()
    # Megatron's TransformerConfig refuses MoE biases with expert TP > 1: no bias case.
    swiglu_sigmoid = tiny_config(gated_linear_unit=True, activation_func=F.silu, moe_router_score_function="sigmoid")
    out = {
        "parity": {"gelu-softmax": _parity(gelu_softmax, rank), "swiglu-sigmoid": _parity(swiglu_sigmoid, rank)},
        "refusals": _refusals(),
    }
    # Attention TP 2 = expert TP 2 without sequence parallelism: both TP ranks hold the same tokens and would each
    # dispatch them; refused.
    init_megatron(tp=2, ep=EP, etp=ETP)
    try:
        LargeEPMoELayer(tiny_config(sequence_parallel=False), layer_number=1)
        out["refusals"]["tp_without_sp"] = "no error"
    except NotImplementedError as e:
        out["refusals"]["tp_without_sp"] = str(e)
    return out


@pytest.fixture(scope="module")
def ep2_etp2() -> list[dict[str, Any]]:
    return world(_rank, EP * ETP, timeout=240)


def test_expert_tp_layer_matches_dense_reference(ep2_etp2: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ep2_etp2):
        for case, errors in result["parity"].items():
            assert errors.pop("scale") > 1e-2, (rank, case)
            bad = {k: v for k, v in errors.items() if not (v == 0.0 if k.endswith(".init") else v <= TOL)}
            assert not bad, f"rank {rank}, {case}: expert-TP layer differs from the dense reference: {bad}"
            assert "expert.fc2.weight.grad" in errors and "router.weight" in errors, errors


def test_expert_tp_refuses_checkpoint_and_colocated_experts(ep2_etp2: list[dict[str, Any]]) -> None:
    for result in ep2_etp2:
        assert "expert_tensor_parallel_size=2" in result["refusals"]["checkpoint"], result["refusals"]
        assert "expert_tensor_parallel_size=2 with a colocated placement" in result["refusals"]["colocated"], \
            result["refusals"]
        assert "needs sequence_parallel=True" in result["refusals"]["tp_without_sp"], result["refusals"]
