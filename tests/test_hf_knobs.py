"""The knobs every training recipe turns, on the plain PyTorch route (torchrun, ``docs/huggingface.md``), each against
the unconverted Hugging Face model.

The reference is the unconverted tiny model trained in the pytest process, on one process, on the concatenated
batch of all ranks (rank 0's sequences first), with the same optimizer; each rank feeds its own tokens. SGD keeps the
fp32 noise below 1e-6, so a difference of 1e-5 is a real one. One world of 4 gloo ranks runs:

* **clipping**: ``largeep_plugin.clip_grad_norm_(model, 0.05)`` (active: the norm is ~1) at EP 4, EP 2 x 2 copies
  (two experts per rank), EP 4 under torch DDP, EP 4 with 2 experts (replicas) and the inf-norm at EP 2 x 2: every
  step's norm equals the reference's ``torch.nn.utils.clip_grad_norm_`` and is the same on every rank, and after 4
  steps every parameter equals the reference's; torch's own ``clip_grad_norm_`` on a rank's parameters gives each
  rank another norm (what the plugin's fixes);
* **gradient accumulation** with the plugin's aux loss (``aux_loss_coeff``) and a balancing bias, 3 micro-batches,
  ``set_aux_loss_scale(model, 1 / 3)``: the parameters of one step over the reference's 3 micro-batches (its loss
  plus the same aux loss written from the formula), the counts of the step (3 micro-batches, not one) and the bias
  of those counts; without the scale the aux gradient is 3x too large (shown, not wanted);
* **activation checkpointing**, ``gradient_checkpointing_enable()`` before the conversion (non-reentrant, EP 4) and
  after it (``use_reentrant=True``, EP 2 x 2), with the aux loss, a bias and 3 micro-batches: the same loss,
  parameters, counts (not doubled by the recompute) and bias as the reference trained without checkpointing (one
  step: the reference Mixtral has no selection bias, so a second step would route differently);
* **bf16 autocast** on the CPU: the converted model under autocast differs from the unconverted fp32 model no more
  than the unconverted model under autocast does (logits, each token's loss, dense gradients);
* **weight-decay groups** (gpt-oss, SGD with weight decay 0.1): ``lhf.weight_decay_groups`` decays what
  ``p.ndim >= 2`` decays on the unconverted model (its fused expert biases are 2-D, ours 1-D), so 4 steps give the
  reference's parameters; the same rule applied to the converted tensors does not;
* **eval and generate**: ``model.eval()`` logits equal the reference's and count nothing; greedy ``generate`` of 5
  tokens equals the unconverted model's on every rank, also with an EOS that the ranks reach at different steps (the
  converted ``generate`` keeps finished ranks in the all-to-alls: no hang); ``synced_gpus=False`` is a ValueError.

Run with ``-s`` to see the measured differences (the knobs table of docs/huggingface.md).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from conftest import world  # noqa: E402
from hf_models import dense_and_experts, param_errors, reference_aux, tiny_model, tokens  # noqa: E402

WORLD, BATCH, SEQ = 4, 2, 8
CLIP, CLIP_STEPS, CLIP_LR = 0.05, 4, 1.0
MICRO, AUX, RATE, LR = 3, 0.05, 0.01, 0.5
# (name, EP size, experts, DDP, norm type) of the clipping runs.
CLIP_RUNS = (("ep4", 4, 4, False, 2.0), ("ep2x2", 2, 4, False, 2.0), ("ep4_ddp", 4, 4, True, 2.0),
             ("ep4_replicas", 4, 2, False, 2.0), ("ep2x2_inf", 2, 4, False, float("inf")))


def _batch(step: int, rank: int, micro: int = 0) -> torch.Tensor:
    return tokens(BATCH, SEQ, seed=1000 * step + 100 * micro + rank)


def _converted(family: str, experts: int, ep_size: int, **overrides):  # type: ignore[no-untyped-def]
    from largeep_plugin.hf import convert_model, parallel_groups

    groups = parallel_groups(ep_size)
    model = tiny_model(family, experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation
        convert_model(model, groups.ep_group, allow_colocate=True, **overrides)
    return model.train(), groups


def _biases_and_counts(model) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    from largeep_plugin.layer.moe_layer import moe_layers

    return ({n: m.router.expert_bias.clone() for n, m in moe_layers(model)},
            {n: m.tokens_per_expert_since_update.clone() for n, m in moe_layers(model)})


# ---- clipping -----------------------------------------------------------------------------------------------------
def _clip_run(rank: int, ep_size: int, experts: int, ddp: bool, norm_type: float, clip=None) -> dict:  # type: ignore[no-untyped-def]
    """4 SGD steps clipped by ``clip`` (default: the plugin's ``clip_grad_norm_``); the norms it returned, the norm
    torch would take on this rank, this rank's parameters."""
    import largeep_plugin as lep
    import largeep_plugin.hf as lhf

    model, _ = _converted("mixtral", experts, ep_size)
    runner = lhf.wrap_ddp(model) if ddp else model
    optimizer = torch.optim.SGD(model.parameters(), lr=CLIP_LR)
    norms, torch_norms = [], []
    for step in range(CLIP_STEPS):
        ids = _batch(step, rank)
        runner(input_ids=ids, labels=ids).loss.backward()
        lep.allreduce_gradients(lhf.expert_parameters(model) if ddp else model)
        # What every recipe writes, for the record (not applied): this rank's own norm.
        torch_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)))
        norms.append(float((clip or lhf.clip_grad_norm_)(model.parameters(), CLIP, norm_type)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(dense_and_experts(model), norms=norms, torch_norms=torch_norms)


def _clip_reference(experts: int, norm_type: float) -> tuple[torch.nn.Module, list[float]]:
    ref = tiny_model("mixtral", experts).train()
    optimizer = torch.optim.SGD(ref.parameters(), lr=CLIP_LR)
    norms = []
    for step in range(CLIP_STEPS):
        ids = torch.cat([_batch(step, r) for r in range(WORLD)])
        ref(input_ids=ids, labels=ids).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP, norm_type)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ref, norms


# ---- the plugin's aux loss under accumulation; activation checkpointing --------------------------------------------
def _aux_reference(steps: int, ep_size: int) -> dict:
    """The unconverted Mixtral with the reference aux loss, MICRO micro-batches per step, SGD; the bias it implies
    (the counts of a step's micro-batches over the whole world) and the counts per copy."""
    ref = tiny_model("mixtral", WORLD).train()
    ref.router_aux_loss_coef = 0.0   # Hugging Face's own balancing loss stays out of .loss
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    copies = WORLD // ep_size
    bias = torch.zeros(2, WORLD)
    losses, counts = [], None
    for step in range(steps):
        counts = torch.zeros(copies, 2, WORLD, dtype=torch.int64)
        loss_sum = 0.0
        for m in range(MICRO):
            ids = torch.cat([_batch(step, r, m) for r in range(WORLD)])
            out = ref(input_ids=ids, labels=ids, output_router_logits=True)
            ((out.loss + reference_aux(out.router_logits, AUX, copies)) / MICRO).backward()
            loss_sum += float(out.loss.detach()) / MICRO   # the model's loss, as the converted run reports it
            for layer, logits in enumerate(out.router_logits):
                picks = torch.nn.functional.one_hot(logits.softmax(-1).topk(2, dim=-1).indices, WORLD).sum(1)
                counts[:, layer] += picks.reshape(copies, -1, WORLD).sum(1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = counts.sum(0).float()
        bias += RATE * torch.sign(total.mean(-1, keepdim=True) - total)
        losses.append(loss_sum)
    return {"model": ref, "losses": losses, "counts": counts, "bias": bias}


def _aux_run(rank: int, ep_size: int, steps: int, scale: bool, checkpointing: str | None = None) -> dict:
    """The converted Mixtral, MICRO micro-batches per step with the loss divided by MICRO; the plugin's aux loss
    (scaled by 1 / MICRO when ``scale``) and bias; ``checkpointing``: None, "before" the conversion (transformers'
    default, non-reentrant) or "after" it (reentrant)."""
    import largeep_plugin as lep
    from largeep_plugin.hf import convert_model, parallel_groups

    groups = parallel_groups(ep_size)
    model = tiny_model("mixtral", WORLD).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation; gradient_checkpointing_enable's deprecation
        if checkpointing == "before":
            model.gradient_checkpointing_enable()
        convert_model(model, groups.ep_group, allow_colocate=True, aux_loss_coeff=AUX, bias_update_rate=RATE)
        if checkpointing == "after":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if scale:
        lep.set_aux_loss_scale(model, 1.0 / MICRO)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, counts = [], {}
    for step in range(steps):
        total = torch.zeros(())
        for m in range(MICRO):
            ids = _batch(step, rank, m)
            # Non-reentrant checkpoints stop a recompute once the backward has what it needs, often before the
            # layer's counting: without that early stop the recompute runs the whole forward, counting included.
            with warnings.catch_warnings(), torch.utils.checkpoint.set_checkpoint_early_stop(False):
                warnings.simplefilter("ignore")  # use_cache=True is incompatible with gradient checkpointing
                loss = model(input_ids=ids, labels=ids).loss / MICRO
                loss.backward()
            total += loss.detach()
        lep.allreduce_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _, counts = _biases_and_counts(model)
        lep.update_expert_biases(model, groups.dp_group)
        torch.distributed.all_reduce(total)
        losses.append(float(total) / WORLD)
    biases, _ = _biases_and_counts(model)
    return dict(dense_and_experts(model), losses=losses, counts=counts, biases=biases)


# ---- bf16 autocast ------------------------------------------------------------------------------------------------
def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each token's next-token cross entropy (what the model's mean loss averages), float32."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="none").detach()


def _bf16_run(rank: int) -> dict:
    import largeep_plugin as lep

    model, _ = _converted("mixtral", WORLD, WORLD)
    ids = _batch(0, rank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    lep.allreduce_gradients(model)
    loss = out.loss.detach().float().clone()
    torch.distributed.all_reduce(loss)
    return {"logits": out.logits.detach().float(), "loss": float(loss) / WORLD, "token_losses": _token_losses(out.logits, ids),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if ".moe." not in n}}


# ---- weight-decay groups ------------------------------------------------------------------------------------------
def _decay_run(rank: int, rule: str) -> dict:
    import largeep_plugin as lep
    import largeep_plugin.hf as lhf

    model, _ = _converted("gpt_oss", WORLD, WORLD)
    if rule == "helper":
        groups = lhf.weight_decay_groups(model, 0.1)
    else:   # the common rule applied to the converted tensors
        groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=LR)
    for step in range(4):
        ids = _batch(step, rank)
        model(input_ids=ids, labels=ids).loss.backward()
        lep.allreduce_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(dense_and_experts(model), decayed=sum(p.numel() for p in groups[0]["params"]))


def _decay_reference() -> torch.nn.Module:
    ref = tiny_model("gpt_oss", WORLD).train()
    groups = [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=LR)
    for step in range(4):
        ids = torch.cat([_batch(step, r) for r in range(WORLD)])
        ref(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ref


# ---- eval and generate --------------------------------------------------------------------------------------------
def _generate_run(rank: int, ep_size: int) -> dict:
    from largeep_plugin.layer.moe_layer import moe_layers

    ref = tiny_model("mixtral", 4).eval()
    model, _ = _converted("mixtral", 4, ep_size)
    model.eval()
    for m in (ref, model):
        m.generation_config.eos_token_id = None   # no EOS unless given
    ids = _batch(9, rank)
    with torch.no_grad():
        eval_err = float((model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max())
    counted = sum(int(m.tokens_per_expert_since_update.sum()) for _, m in moe_layers(model))
    prompt = tokens(1, 4, seed=50 + rank)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    # Every rank knows every rank's unconverted generation (same weights everywhere): pick an EOS that rank 0
    # produces first and that the others reach later or never, so that the ranks stop at different steps.
    with torch.no_grad():
        plain = [ref.generate(tokens(1, 4, seed=50 + r), **kwargs)[0, 4:] for r in range(WORLD)]
    eos = int(plain[0][0])
    stops = [int((p == eos).nonzero()[0]) if bool((p == eos).any()) else 5 for p in plain]
    out = {"eval": eval_err, "counted": counted, "stops": stops}
    with torch.no_grad():
        for name, extra in (("generate", {}), ("eos", dict(eos_token_id=eos))):
            got = model.generate(prompt, **kwargs, **extra)
            want = ref.generate(prompt, **kwargs, **extra)
            out[name] = got.tolist() == want.tolist()
        try:
            model.generate(prompt, synced_gpus=False, **kwargs)
            out["unsynced"] = "no error"
        except ValueError as e:
            out["unsynced"] = str(e)
    return out


def _world(rank: int, world_size: int) -> dict:
    out: dict = {}
    for name, ep, experts, ddp, norm in CLIP_RUNS:
        out[name] = _clip_run(rank, ep, experts, ddp, norm)
    out["ep4_torch_clip"] = _clip_run(rank, 4, 4, False, 2.0, clip=torch.nn.utils.clip_grad_norm_)
    out["aux_scaled"] = _aux_run(rank, WORLD, 1, scale=True)
    out["aux_unscaled"] = _aux_run(rank, WORLD, 1, scale=False)
    # One step each: the reference Mixtral has no selection bias, so after a bias update their routing parts.
    out["ckpt_before"] = _aux_run(rank, WORLD, 1, scale=True, checkpointing="before")
    out["ckpt_after"] = _aux_run(rank, 2, 1, scale=True, checkpointing="after")
    out["plain_ep2"] = _aux_run(rank, 2, 1, scale=True)
    out["bf16"] = _bf16_run(rank)
    out["decay_helper"] = _decay_run(rank, "helper")
    out["decay_ndim"] = _decay_run(rank, "ndim")
    out["generate_ep4"] = _generate_run(rank, 4)
    out["generate_ep2x2"] = _generate_run(rank, 2)
    return out


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return world(_world, WORLD, timeout=600.0)


def test_clip_grad_norm_is_the_unconverted_models(per_rank) -> None:  # type: ignore[no-untyped-def]
    report = {}
    for name, _, experts, _, norm_type in CLIP_RUNS:
        ref, ref_norms = _clip_reference(experts, norm_type)
        norms = [res[name]["norms"] for res in per_rank]
        assert all(n == norms[0] for n in norms), (name, norms)   # one coefficient on every rank
        norm_err = max(abs(a - b) / b for a, b in zip(norms[0], ref_norms))
        errs = [param_errors(ref, res[name]) for res in per_rank]
        params = max(max(e.values()) for e in errs)
        spread = max(abs(a - b) for res in per_rank for a, b in zip(res[name]["torch_norms"], ref_norms))
        report[name] = dict(norm_rel=norm_err, params=params, torch_norm_off=spread)
        assert norm_err < 1e-6 and params < 1e-6, (name, report[name], norms[0], ref_norms)
        # The dense parameters stay bit-identical on every rank.
        for res in per_rank[1:]:
            assert all(torch.equal(v, per_rank[0][name]["dense"][k]) for k, v in res[name]["dense"].items()), name
    # torch's own clip_grad_norm_ on a rank's parameters: another norm on each rank, parameters that drift from the
    # reference and apart between ranks (what every recipe got before).
    ref, _ = _clip_reference(4, 2.0)
    torch_clip = [res["ep4_torch_clip"] for res in per_rank]
    report["torch clip_grad_norm_ at EP 4"] = dict(
        norms=[n["norms"][0] for n in torch_clip],
        params=max(max(param_errors(ref, n).values()) for n in torch_clip),
        rank_spread=max(float((n["dense"][k] - torch_clip[0]["dense"][k]).abs().max())
                        for n in torch_clip for k in n["dense"]))
    assert report["ep4"]["torch_norm_off"] > 1e-4 and report["torch clip_grad_norm_ at EP 4"]["rank_spread"] > 0, report
    print("\nclipping:", report)


def test_accumulated_aux_loss_follows_the_trainers_scale(per_rank) -> None:  # type: ignore[no-untyped-def]
    ref = _aux_reference(1, WORLD)
    report = {}
    for name in ("aux_scaled", "aux_unscaled"):
        errs = [param_errors(ref["model"], res[name]) for res in per_rank]
        report[name] = max(max(e.values()) for e in errs)
    print("\naux under accumulation:", report, "loss", per_rank[0]["aux_scaled"]["losses"], ref["losses"])
    assert report["aux_scaled"] < 1e-6, report
    assert report["aux_unscaled"] > 1e-4, report    # the scale matters: without it the aux gradient is 3x
    for res in per_rank:
        got = res["aux_scaled"]
        # The counts of the whole step (3 micro-batches) and the bias they give, on every rank.
        assert [got["counts"][f"model.layers.{i}.mlp.moe"].tolist() for i in range(2)] == \
            ref["counts"][0].tolist()
        assert all(torch.equal(got["biases"][f"model.layers.{i}.mlp.moe"], ref["bias"][i]) for i in range(2))


@pytest.mark.parametrize("case, ep_size", [("ckpt_before", WORLD), ("ckpt_after", 2), ("plain_ep2", 2)])
def test_activation_checkpointing_counts_once(per_rank, case, ep_size) -> None:  # type: ignore[no-untyped-def]
    ref = _aux_reference(1, ep_size)
    errs = [param_errors(ref["model"], res[case]) for res in per_rank]
    loss = max(abs(a - b) for a, b in zip(per_rank[0][case]["losses"], ref["losses"]))
    print(f"\n{case}: params {max(max(e.values()) for e in errs):.2e}, loss {loss:.2e}")
    assert max(max(e.values()) for e in errs) < 1e-6 and loss < 1e-6, (errs, loss)
    for rank, res in enumerate(per_rank):
        copy_ = rank // ep_size
        assert [res[case]["counts"][f"model.layers.{i}.mlp.moe"].tolist() for i in range(2)] == \
            ref["counts"][copy_].tolist(), (rank, res[case]["counts"], ref["counts"])
        assert all(torch.equal(res[case]["biases"][f"model.layers.{i}.mlp.moe"], ref["bias"][i]) for i in range(2))


def test_bf16_autocast_differs_no_more_than_the_unconverted_model_itself(per_rank) -> None:  # type: ignore[no-untyped-def]
    ref = tiny_model("mixtral", WORLD).train()
    ids = torch.cat([_batch(0, r) for r in range(WORLD)])
    fp32 = ref(input_ids=ids, labels=ids)
    fp32.loss.backward()
    g32 = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ref(input_ids=ids, labels=ids)
    bf16.loss.backward()
    g16 = {n: p.grad.clone() for n, p in ref.named_parameters()}
    logits = torch.cat([res["bf16"]["logits"] for res in per_rank])
    dense = [n for n in per_rank[0]["bf16"]["grads"]]
    token_losses = torch.cat([res["bf16"]["token_losses"] for res in per_rank])
    grads = per_rank[0]["bf16"]["grads"]

    def diff(logits_a, losses_a, grads_a, logits_b, losses_b, grads_b) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {"logits": float((logits_a - logits_b).abs().max()),
                "token losses": float((losses_a - losses_b).abs().max()),
                "dense grads": max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads)}

    ref16, ref32 = _token_losses(bf16.logits, ids), _token_losses(fp32.logits, ids)
    own = diff(bf16.logits.float(), ref16, g16, fp32.logits, ref32, g32)
    conv = diff(logits, token_losses, grads, fp32.logits, ref32, g32)
    to_bf16 = diff(logits, token_losses, grads, bf16.logits.float(), ref16, g16)
    print("\nbf16 autocast: unconverted bf16 vs unconverted fp32", own, "| converted bf16 vs unconverted fp32", conv,
          "| converted bf16 vs unconverted bf16", to_bf16)
    # The converted model under autocast is as close to the fp32 model as the unconverted one under autocast.
    assert all(conv[k] <= own[k] for k in own), (own, conv)


def test_weight_decay_groups_follow_the_unconverted_tensors(per_rank) -> None:  # type: ignore[no-untyped-def]
    ref = _decay_reference()
    helper = max(max(param_errors(ref, res["decay_helper"]).values()) for res in per_rank)
    ndim = max(max(param_errors(ref, res["decay_ndim"]).values()) for res in per_rank)
    decayed = {k: per_rank[0][k]["decayed"] for k in ("decay_helper", "decay_ndim")}
    print(f"\nweight decay: helper {helper:.2e}, p.ndim rule on the converted model {ndim:.2e}, decayed {decayed}")
    assert helper < 1e-6 and ndim > 1e-4, (helper, ndim)


@pytest.mark.parametrize("case", ["generate_ep4", "generate_ep2x2"])
def test_eval_and_generate_equal_the_unconverted_model(per_rank, case) -> None:  # type: ignore[no-untyped-def]
    for res in per_rank:
        got = res[case]
        assert got["eval"] < 1e-5 and got["counted"] == 0, got
        assert got["generate"] and got["eos"], got
        assert got["unsynced"].startswith("generate(synced_gpus=False) on a model with large-EP layers"), got
    print(f"\n{case}: eval logits {max(res[case]['eval'] for res in per_rank):.2e}, generate equal, "
          f"EOS reached at steps {per_rank[0][case]['stops']} (no hang)")
    stops = per_rank[0][case]["stops"]
    assert stops[0] == 0 and len(set(stops)) > 1, stops   # the ranks really stop at different steps


def test_generate_of_a_copy_is_the_copys() -> None:
    from largeep_plugin.hf import convert_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process holds every expert
        model = convert_model(tiny_model("mixtral", 4))
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin and model.generate.__self__ is model
    prompt = tokens(1, 4, seed=5)
    assert torch.equal(twin.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0))
