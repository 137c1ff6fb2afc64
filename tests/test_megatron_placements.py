"""Training under placements inside Megatron: colocated experts (EP < experts) and replicated experts (EP > experts).

Each case builds a model at one EP size, copies it through the distributed checkpoint into a model at the other
(so both start from the same weights), trains both with Megatron's ``finalize_model_grads`` over
``GlooDataParallel`` and SGD on the same per-rank tokens, and compares every expert, by its global id, between them:

* 4 experts, EP 4 (one per rank) against EP 2 with two colocated experts per rank;
* 2 experts, EP 2 (one per rank) against EP 4 with each expert replicated twice: the replicas' gradients are
  summed over the replicas (``sum_replica_gradients_``), so they equal the lone expert's and the replicas stay
  identical step after step. Twice: under ``GlooDataParallel`` (which sums them in ``finish_grad_sync``), and
  under a stand-in for Megatron's DDP (whose buffers need CUDA) on its gradient path: Megatron's reduction
  without a replica sum, gradients in ``param.main_grad``, the optimizer reading ``main_grad``; there
  ``enable_replica_gradient_sum`` makes ``config.finalize_model_grads_func`` sum them.

Without either a replicated layer refuses to train (Megatron's DDP does not sum replicas).
"""
from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated", "ignore:LargeEPMoELayer")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import world  # noqa: E402
from megatron_helpers import dist_load, dist_save, init_megatron, placement_for, tiny_config, tiny_gpt, tokens  # noqa: E402,E501

VOCAB, SEQ, STEPS, LR = 32, 8, 3, 0.5


def _build(experts: int, ep: int, seed: int) -> Any:
    init_megatron(ep=ep)
    cfg = tiny_config(num_layers=2, num_moe_experts=experts)
    return cfg, tiny_gpt(cfg, seed=seed, vocab=VOCAB, seq=SEQ, large_ep={"init_seed": seed},
                         placement=placement_for(experts, ep))


def _experts(model: Any, grads: bool) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, expert id): fc1 weight (or its gradient)} of this rank's experts."""
    from largeep_plugin.integrations.megatron import large_ep_moe_layers

    out = {}
    for i, (_, layer) in enumerate(large_ep_moe_layers(model)):
        for expert_id, module in layer.experts.experts_by_id():
            w = module.fc1.weight
            out[(i, expert_id)] = (w.grad if grads else w).detach().clone()
    return out


def _main_grad_ddp(config: Any, module: torch.nn.Module) -> Any:
    """A stand-in for Megatron's DDP (whose buffers need CUDA), on its gradient path: Megatron's reduction
    (``GlooDataParallel.reduce_data_parallel``) and no replica sum, then the gradients moved to
    ``param.main_grad`` where DDP keeps them."""
    from largeep_plugin.integrations.megatron import GlooDataParallel, large_ep_moe_layers

    class _MainGradDDP(GlooDataParallel):
        def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
            self.reduce_data_parallel()
            for p in self.module.parameters():
                p.main_grad, p.grad = (p.grad if p.grad is not None else torch.zeros_like(p)), None

        def scale_gradients(self, scaling_factor: float) -> None:
            for p in self.module.parameters():
                p.main_grad.mul_(scaling_factor)

    ddp = _MainGradDDP(config, module)
    for _, layer in large_ep_moe_layers(module):
        layer.replica_grads_summed = False  # Megatron's DDP does not sum replicas: enable_replica_gradient_sum must
    return ddp


def _megatron_grad_norm(model: Any) -> float:
    """The norm Megatron's ``clip_grad`` takes, with its own parameter filter: ``get_megatron_optimizer`` gives dense
    parameters one optimizer (norm summed over TP x PP) and expert parameters (``allreduce=False``) another (over
    TP x EP x PP), and ``ChainedOptimizer`` adds the two squares. Its optimizers allocate on CUDA when built, so the
    filter (``MegatronOptimizer.get_main_grads_for_grad_norm``: shared parameters and TP duplicates left out) runs on
    an optimizer object that was not; the two sums are what ``get_grad_norm_fp32`` does (on CUDA)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    total = 0.0
    for expert, group in ((False, parallel_state.get_model_parallel_group()),
                          (True, parallel_state.get_expert_tensor_model_pipeline_parallel_group())):
        megatron = FP32Optimizer.__new__(FP32Optimizer)
        megatron.optimizer = torch.optim.SGD([p for p in model.parameters()
                                              if (getattr(p, "allreduce", True) is False) == expert], lr=0.0)
        megatron.config = OptimizerConfig()
        square = torch.tensor(sum(float(g.double().norm()) ** 2 for g in megatron.get_main_grads_for_grad_norm()),
                              dtype=torch.float64)
        dist.all_reduce(square, group=group)
        total += float(square)
    return total ** 0.5


def _train(rank: int, cfg: Any, model: Any, ddp_kind: str = "gloo") -> dict[str, Any]:
    from megatron.core.distributed import finalize_model_grads

    from largeep_plugin.integrations.megatron import GlooDataParallel, enable_replica_gradient_sum

    if ddp_kind == "gloo":
        ddp, finalize = GlooDataParallel(cfg, model), finalize_model_grads
    else:
        ddp = _main_grad_ddp(cfg, model)
        cfg.finalize_model_grads_func = None
        assert enable_replica_gradient_sum(ddp, cfg) == 2  # both layers of the model are replicated
        enable_replica_gradient_sum(ddp, cfg)  # idempotent: the sum must not run twice
        finalize = cfg.finalize_model_grads_func
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    first_grads, weights, losses, norms = None, [], [], {}
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        ids, pos = tokens(2, SEQ, VOCAB, seed=100 * step + rank)
        loss = ddp(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        finalize([ddp])
        if ddp_kind == "main_grad":  # Megatron's optimizer steps on main_grad
            for p in model.parameters():
                p.grad = p.main_grad
        if first_grads is None:
            from megatron.core import parallel_state

            import largeep_plugin as lep

            first_grads = _experts(model, grads=True)
            norms = {"megatron": _megatron_grad_norm(model),
                     "plugin": float(lep.grad_norm(model, expert_group=parallel_state.get_expert_data_parallel_group()))}
        optimizer.step()
        weights.append(_experts(model, grads=False))
        losses.append(float(loss))
    return {"grads": first_grads, "weights": weights, "losses": losses, "norms": norms}


def _record_replica_sum(rank: int, model: Any) -> dict[str, Any]:
    """Run ``sum_replica_gradients_`` alone on ``main_grad`` = rank + 1 and record every all_reduce it makes:
    (the global ranks of its group, the elements reduced)."""
    from largeep_plugin.integrations.megatron import large_ep_moe_layers, sum_replica_gradients_

    for p in model.parameters():
        p.main_grad = torch.full_like(p, rank + 1.0)
    calls, real = [], dist.all_reduce

    def recording(tensor: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        calls.append((tuple(sorted(ranks)), tensor.numel()))
        return real(tensor, *args, group=group, **kwargs)

    dist.all_reduce = recording
    try:
        layers = sum_replica_gradients_(model)
    finally:
        dist.all_reduce = real
    held = [(layer.expert_id, sum(p.numel() for p in layer.experts.parameters()))
            for _, layer in large_ep_moe_layers(model)]
    sums = {i: float(layer.experts.expert.fc1.weight.main_grad[0, 0])
            for i, (_, layer) in enumerate(large_ep_moe_layers(model))}
    return {"layers": layers, "calls": calls, "held": held, "sums": sums}


def _case(rank: int, experts: int, eps: tuple[int, int], directory: str) -> dict[str, Any]:
    cfg, source = _build(experts, eps[0], seed=1)
    dist_save(source.sharded_state_dict(), directory)
    out = {"a": _train(rank, cfg, source)}
    cfg, target = _build(experts, eps[1], seed=2)
    target.load_state_dict(dist_load(target.sharded_state_dict(), directory), strict=False)
    out["b"] = _train(rank, cfg, target)
    if eps[1] > experts:  # replicated: again under the stand-in of Megatron's DDP
        cfg, target = _build(experts, eps[1], seed=2)
        target.load_state_dict(dist_load(target.sharded_state_dict(), directory), strict=False)
        out["c"] = _train(rank, cfg, target, ddp_kind="main_grad")
        out["replica_sum"] = _record_replica_sum(rank, target)
    return out


def _refuses_without_gloo_ddp(rank: int) -> str:
    _, model = _build(2, 4, seed=1)
    ids, pos = tokens(2, SEQ, VOCAB, seed=rank)
    try:
        model(ids, pos, None)
    except NotImplementedError as e:
        return str(e)
    return ""


def _rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out = {"colocated": _case(rank, 4, (4, 2), os.path.join(root, "colocated")),
           "replicated": _case(rank, 2, (2, 4), os.path.join(root, "replicated")),
           "refusal": _refuses_without_gloo_ddp(rank)}
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: Any) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("placements")
    for sub in ("colocated", "replicated"):
        (root / sub).mkdir()
    return world(_rank, 4, str(root), timeout=300)


def _by_expert(results: list[dict[str, Any]], case: str, side: str, what: str, step: int | None = None
               ) -> dict[tuple[int, int], list[torch.Tensor]]:
    """{(layer, expert id): [the tensor on every rank holding a copy]} over the 4 ranks."""
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for r in results:
        data = r[case][side][what] if step is None else r[case][side][what][step]
        for key, t in data.items():
            out.setdefault(key, []).append(t)
    return out


@pytest.mark.parametrize("case", ["colocated", "replicated"])
def test_training_under_a_placement_matches_one_expert_per_rank(results: list[dict[str, Any]], case: str) -> None:
    experts = 4 if case == "colocated" else 2
    sides = ("a", "b") if case == "colocated" else ("a", "b", "c")
    grads = [_by_expert(results, case, side, "grads") for side in sides]
    for by_side in grads:
        assert sorted(by_side) == [(i, e) for i in range(2) for e in range(experts)]
    for key in grads[0]:
        want = grads[0][key][0]
        assert float(want.abs().max()) > 0, f"{case} {key}: no gradient reached the expert: nothing tested"
        for side, by_side in zip(sides, grads):  # every copy on every rank, every layout
            for got in by_side[key]:
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), \
                    f"{case}/{side} {key}: {float((got - want).abs().max())}"
    for step in range(STEPS):
        weights = [_by_expert(results, case, side, "weights", step) for side in sides]
        for key in weights[0]:
            for side, by_side in zip(sides, weights):
                for got in by_side[key]:
                    assert torch.allclose(got, weights[0][key][0], rtol=1e-5, atol=1e-6), f"{case}/{side} step {step} {key}"
    for r in results:
        for side in sides[1:]:
            assert r[case]["a"]["losses"] == pytest.approx(r[case][side]["losses"], rel=1e-5), (case, side)


def test_replica_sum_reduces_each_expert_over_its_replicas_only(results: list[dict[str, Any]]) -> None:
    """2 experts at EP 4: rank r holds expert r % 2, so expert e's replicas are ranks {e, e + 2}. The replica sum
    makes one all_reduce per layer, over those two ranks only, of that one expert's parameters (not [E, N] over
    the EP group), and the sum is the two replicas' gradients."""
    for rank, r in enumerate(results):
        got = r["replicated"]["replica_sum"]
        assert got["layers"] == 2
        partners = tuple(sorted({rank, (rank + 2) % 4}))
        assert got["calls"] == [(partners, numel) for _, numel in got["held"]], got
        assert got["sums"] == {0: float(partners[0] + partners[1] + 2)} | {1: float(partners[0] + partners[1] + 2)}


def test_replicas_refuse_training_without_the_replica_sum(results: list[dict[str, Any]]) -> None:
    for r in results:
        for words in ("enable_replica_gradient_sum", "GlooDataParallel", "replicas"):
            assert words in r["refusal"], r["refusal"]


@pytest.mark.parametrize("case", ["colocated", "replicated"])
def test_gradient_norm_counts_each_expert_once(results: list[dict[str, Any]], case: str) -> None:
    """Megatron's clip_grad norm, and the plugin's ``grad_norm`` with Megatron's expert-DP group, are the same under
    every layout: one expert per rank, colocated, replicated (each replica but the first marked ``shared``)."""
    sides = ("a", "b") if case == "colocated" else ("a", "b", "c")
    norms = {(side, kind): [r[case][side]["norms"][kind] for r in results] for side in sides
             for kind in ("megatron", "plugin")}
    want = norms[("a", "megatron")][0]
    print(f"\n{case}: {norms}")
    assert want > 0
    for key, values in norms.items():
        assert all(abs(v - want) <= 1e-6 * want for v in values), (key, values, want)
