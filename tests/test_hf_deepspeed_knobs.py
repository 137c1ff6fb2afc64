"""The training knobs under DeepSpeed (``largeep_plugin.deepspeed.initialize`` with the ``"large_ep"`` section), each
against the unconverted Hugging Face model under plain ``deepspeed.initialize``: the same config without the
section, the same tokens per rank (different on every rank), the same client SGD (fp32 noise below 1e-7).

One world of 4 gloo ranks, tiny Mixtral:

* **``"gradient_clipping": 0.05``** (active: the norm is ~1) at ZeRO 0, 1 and 2 (EP 4), ZeRO 3 (EP 2 x 2 data-parallel
  copies, each expert partitioned over its holders with the AutoEP tags) and ZeRO 0 with a placement that
  replicates experts (2 experts on 4 ranks): four steps give the reference's losses and parameters, and the engine's
  global gradient norm where both engines report one. With the engine's own ZeRO 0 clipping (the average of the
  ranks' norms) put back, the parameters are off (shown, the bug it fixes);
* **``"gradient_accumulation_steps": 3``** with the plugin's aux loss (``load_balance.aux_loss_coeff``), ZeRO 2:
  the reference adds the same aux loss, written from its formula with the counts summed over the world, to its
  loss; two steps give its losses and parameters; with the engine's forward and backward left unwrapped (no aux
  scale) they do not;
* **activation checkpointing** (``gradient_checkpointing_enable()`` before ``initialize``, no early stop) with 3
  micro-batches, the aux loss and a bias, ZeRO 2: one step gives the reference's parameters (trained without
  checkpointing), the counts of the step's 3 micro-batches (not counted again by the recompute) and their bias.

Run with ``-s`` to see the measured differences (the knobs table of docs/huggingface.md).
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from hf_models import dense_and_experts, param_errors, reference_aux, tiny_model, tokens  # noqa: E402
from largeep_plugin.tools.launch import run_world  # noqa: E402

WORLD, BATCH, SEQ, LR, CLIP, AUX, RATE = 4, 2, 8, 1.0, 0.05, 0.05, 0.01
# (name, ZeRO stage, experts, replicated placement) of the clipping runs; EP "auto" = the experts.
CLIP_RUNS = (("z0", 0, 4, False), ("z1", 1, 4, False), ("z2", 2, 4, False), ("z3_copies", 3, 2, False),
             ("z0_replicas", 0, 2, True))


def _config(stage: int, large_ep: dict | None, gas: int = 1, clip: float = 0.0, unmanaged: bool = False) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if unmanaged:
        cfg["managed_gradient_accumulation"] = False
    if large_ep is not None:
        cfg["large_ep"] = large_ep
    return cfg


def _replicated_placement():  # type: ignore[no-untyped-def]
    """2 experts on 4 ranks: expert 0 on ranks 0, 1 and 3 (rank 3 also holds expert 1), expert 1 on ranks 2 and 3."""
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Topology

    return Placement(topology=Topology.uniform(1, WORLD), num_experts=2, rank_to_experts=((0,), (0,), (1,), (0, 1)))


def _engine(experts: int, config: dict, placement=None, checkpointing: bool = False):  # type: ignore[no-untyped-def]
    from largeep_plugin.integrations.deepspeed.engine import initialize

    model = tiny_model("mixtral", experts)
    model.router_aux_loss_coef = 0.0   # output_router_logits=True (the reference's aux loss) adds nothing to .loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation, gradient_checkpointing_enable's deprecation
        if checkpointing:
            model.gradient_checkpointing_enable()
        engine, *_ = initialize(model=model, model_parameters=list(model.parameters()), config=config,
                                optimizer=lambda params: torch.optim.SGD(params, lr=LR), placement=placement)
    return engine


def _snapshot(engine) -> dict:  # type: ignore[no-untyped-def]
    """This rank's parameters (whole, under ZeRO 3 too) as ``dense_and_experts`` gives them."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(list(engine.module.parameters())):
        return dense_and_experts(engine.module)


def _train(engine, rank: int, steps: int, aux: bool = False) -> dict:  # type: ignore[no-untyped-def]
    """``steps`` optimizer steps of ``gradient_accumulation_steps`` micro-batches each: every step's mean loss over
    the world (the model's loss; with ``aux`` and an unconverted model the reference aux loss is added for the
    backward), the engine's global gradient norms, the counts of the last step and the final parameters."""
    import torch.distributed as dist

    from largeep_plugin.layer.moe_layer import moe_layers

    gas = engine.gradient_accumulation_steps()
    converted = bool(list(moe_layers(engine.module)))
    losses, norms, counts = [], [], {}
    for step in range(steps):
        total = torch.zeros(())
        for micro in range(gas):
            ids = tokens(BATCH, SEQ, seed=1000 * step + 10 * micro + rank)
            with torch.utils.checkpoint.set_checkpoint_early_stop(False), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # use_cache with checkpointing
                out = engine(input_ids=ids, labels=ids, output_router_logits=aux and not converted)
                loss = out.loss
                if aux and not converted:
                    loss = loss + reference_aux(out.router_logits, AUX, reduce=dist.all_reduce)
                engine.backward(loss)
            if micro == gas - 1:
                counts = {n: m.tokens_per_expert_since_update.clone() for n, m in moe_layers(engine.module)}
            engine.step()
            total += out.loss.detach()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD / gas)
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
    biases = {n: m.router.expert_bias.clone() for n, m in moe_layers(engine.module)}
    return dict(_snapshot(engine), losses=losses, norms=norms, counts=counts, biases=biases)


def _unwrapped(engine, *names: str):  # type: ignore[no-untyped-def]
    """``engine`` with the instance attributes ``knobs.follow_engine`` set taken back to the class's methods."""
    for name in names:
        setattr(engine, name, types.MethodType(getattr(type(engine), name), engine))
    return engine


def _world(rank: int, world: int) -> dict:
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    section = {"enabled": True, "ep_size": "auto", "load_balance": {"bias_update_rate": 0.0}}
    out: dict = {}
    for name, stage, experts, replicated in CLIP_RUNS:
        placement = _replicated_placement() if replicated else None
        cfg = _config(stage, None, clip=CLIP, unmanaged=replicated)
        out[name] = {"reference": _train(_engine(experts, cfg), rank, 4),
                     "converted": _train(_engine(experts, dict(cfg, large_ep=dict(section, ep_size=WORLD)
                                                                if replicated else section), placement), rank, 4)}
    cfg = _config(0, section, clip=CLIP)
    out["z0_engine_clip"] = _train(_unwrapped(_engine(4, cfg), "clip_fp32_gradients"), rank, 4)

    aux = dict(section, load_balance={"bias_update_rate": 0.0, "aux_loss_coeff": AUX})
    out["gas"] = {"reference": _train(_engine(4, _config(2, None, gas=3)), rank, 2, aux=True),
                  "converted": _train(_engine(4, _config(2, aux, gas=3)), rank, 2, aux=True)}
    out["gas_unscaled"] = _train(_unwrapped(_engine(4, _config(2, aux, gas=3)), "forward", "backward"), rank, 2,
                                 aux=True)
    biased = dict(aux, load_balance={"bias_update_rate": RATE, "aux_loss_coeff": AUX})
    out["checkpointing"] = _train(_engine(4, _config(2, biased, gas=3), checkpointing=True), rank, 1, aux=True)
    return out


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    import transformers  # noqa: F401  (imported once here, not once per forked rank)
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    return run_world(_world, WORLD, timeout=600)


def _errors(ref_run: dict, run: dict, experts: int) -> dict[str, float]:
    """Losses and parameters of ``run`` against ``ref_run`` (the unconverted model, whole on every rank)."""
    ref = tiny_model("mixtral", experts)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(ref_run["dense"][name])
    return dict(param_errors(ref, run), loss=max(abs(a - b) for a, b in zip(ref_run["losses"], run["losses"])))


@pytest.mark.parametrize("case", [c[0] for c in CLIP_RUNS])
def test_gradient_clipping_equals_the_plain_engine(per_rank, case) -> None:  # type: ignore[no-untyped-def]
    experts = next(c[2] for c in CLIP_RUNS if c[0] == case)
    worst: dict[str, float] = {}
    for res in per_rank:
        errs = _errors(res[case]["reference"], res[case]["converted"], experts)
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in errs.items()}
        ref_norms, norms = res[case]["reference"]["norms"], res[case]["converted"]["norms"]
        both = [(a, b) for a, b in zip(ref_norms, norms) if a is not None and b is not None]
        worst["norm_rel"] = max([abs(a - b) / a for a, b in both] + [worst.get("norm_rel", 0.0)])
    print(f"\nclipping {case}: {worst}, norms {per_rank[0][case]['converted']['norms']}")
    assert all(v < 1e-6 for v in worst.values()), worst
    assert per_rank[0][case]["converted"]["losses"][-1] < per_rank[0][case]["converted"]["losses"][0]


def test_the_engines_own_zero0_clipping_was_off(per_rank) -> None:  # type: ignore[no-untyped-def]
    errs = _errors(per_rank[0]["z0"]["reference"], per_rank[0]["z0_engine_clip"], 4)
    print(f"\nZeRO 0 with the engine's clip_fp32_gradients (average of the ranks' norms): {errs}")
    assert errs["dense"] > 1e-6, errs   # 1000x what the fixed clipping leaves


def test_accumulated_aux_loss_follows_the_engine(per_rank) -> None:  # type: ignore[no-untyped-def]
    worst, unscaled = 0.0, 0.0
    for res in per_rank:
        worst = max(worst, max(_errors(res["gas"]["reference"], res["gas"]["converted"], 4).values()))
        unscaled = max(unscaled, max(_errors(res["gas"]["reference"], res["gas_unscaled"], 4).values()))
    print(f"\ngradient accumulation 3 with the aux loss: {worst:.2e}; without the engine's scale: {unscaled:.2e}")
    assert worst < 1e-6 and unscaled > 1e-4, (worst, unscaled)


def test_activation_checkpointing_counts_once_under_deepspeed(per_rank) -> None:  # type: ignore[no-untyped-def]
    # The reference: the first step of the unconverted run with the aux loss ("gas" case) is one step of 3
    # micro-batches; its counts come from its router over the world's tokens.
    ref = tiny_model("mixtral", 4).train()
    ref.router_aux_loss_coef = 0.0
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    counts = torch.zeros(2, 4, dtype=torch.int64)
    losses = []
    for micro in range(3):
        ids = torch.cat([tokens(BATCH, SEQ, seed=10 * micro + r) for r in range(WORLD)])
        out = ref(input_ids=ids, labels=ids, output_router_logits=True)
        ((out.loss + reference_aux(out.router_logits, AUX)) / 3).backward()
        losses.append(float(out.loss))
        for layer, logits in enumerate(out.router_logits):
            counts[layer] += torch.nn.functional.one_hot(logits.softmax(-1).topk(2, dim=-1).indices, 4).sum((0, 1))
    optimizer.step()
    bias = RATE * torch.sign(counts.float().mean(-1, keepdim=True) - counts.float())
    worst = 0.0
    for res in per_rank:
        got = res["checkpointing"]
        worst = max(worst, max(param_errors(ref, got).values()), abs(got["losses"][0] - sum(losses) / 3))
        # Counts over the step's 3 micro-batches of the EP group (the world), as many as the reference routed.
        assert [got["counts"][f"model.layers.{i}.mlp.moe"].tolist() for i in range(2)] == counts.tolist()
        assert all(torch.equal(got["biases"][f"model.layers.{i}.mlp.moe"], bias[i]) for i in range(2))
    print(f"\nactivation checkpointing under DeepSpeed: {worst:.2e}")
    assert worst < 1e-6, worst
