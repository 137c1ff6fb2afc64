"""A converted Hugging Face model trained with plain PyTorch (``docs/huggingface.md``, "Plain PyTorch and torchrun").

The reference is independent of the plugin: the unconverted Mixtral trained in the pytest process, on one
process, on the concatenated batch of all ranks (rank 0's sequences first), with the same AdamW. Each rank's loss is
the mean over its own tokens and all ranks have as many, so the mean of the ranks' losses is the reference's loss.

One world of 4 gloo ranks trains the converted model 5 steps four ways: EP 4 (one expert per rank) and EP 2 x 2
data-parallel copies (two experts per rank), each with recipe (a), ``allreduce_gradients(model)``, and recipe (b),
torch DDP over the dense parameters with the experts ignored plus ``allreduce_gradients`` of the experts.
Compared (fp32): every step's mean loss, and at the end every dense parameter, the router and each expert of the
reference against the rank that holds it (every rank that holds it). Also: one step of two accumulated
micro-batches under DDP at EP 2 x 2 with a balancing bias gives the reference's parameters, each copy's own token
counts (DDP's buffer broadcast must not replace them by rank 0's) and, on every rank, the bias of the reference's
global counts (summed over both copies); an EP size that does not divide the world is a ValueError. Last, the
example script runs under ``torch.distributed.run`` on 2 ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from conftest import world  # noqa: E402
from hf_models import tiny_model, tokens  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, STEPS, LR, BATCH, SEQ = 4, 5, 1e-2, 2, 8
BIAS_RATE = 0.01
# (EP size, recipe) of the four runs; the world is 4 ranks.
RUNS = ((4, "a"), (4, "b"), (2, "a"), (2, "b"))
MICRO = 2   # micro-batches per step of the run with a balancing bias


def _batch(step: int, rank: int, micro: int = 0) -> torch.Tensor:
    return tokens(BATCH, SEQ, seed=1000 * step + 100 * micro + rank)


def _converted(ep_size: int, bias_update_rate: float):  # type: ignore[no-untyped-def]
    from largeep_plugin.hf import convert_model, parallel_groups

    groups = parallel_groups(ep_size)
    model = tiny_model("mixtral", E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the colocation warning at EP 2
        convert_model(model, groups.ep_group, allow_colocate=True, bias_update_rate=bias_update_rate)
    return model.train(), groups


def _train(rank: int, world_size: int, ep_size: int, recipe: str, steps: int, bias_update_rate: float,
           micro: int = 1) -> dict:
    """The documented step, ``steps`` times, each over ``micro`` micro-batches (gradients accumulated; under DDP
    without ``no_sync``, so DDP broadcasts its buffers before every forward); the mean losses and this rank's final
    parameters, biases and the token counts of the last step."""
    import torch.distributed as dist

    import largeep_plugin as lep
    from largeep_plugin.hf import expert_parameters, wrap_ddp
    from largeep_plugin.layer.grads import is_expert_param
    from largeep_plugin.layer.moe_layer import moe_layers

    model, groups = _converted(ep_size, bias_update_rate)
    runner = wrap_ddp(model) if recipe == "b" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        loss = torch.zeros(())
        for m in range(micro):
            ids = _batch(step, rank, m)
            part = runner(input_ids=ids, labels=ids).loss / micro
            part.backward()
            loss = loss + part.detach()
        lep.allreduce_gradients(expert_parameters(model) if recipe == "b" else model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = {name: layer.tokens_per_expert_since_update.clone() for name, layer in moe_layers(model)}
        lep.update_expert_biases(model, groups.dp_group)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world_size)
    experts, biases = {}, {}
    for name, block in model.named_modules():
        if type(block).__name__ == "LargeEPHFBlock":
            biases[name] = block.moe.router.expert_bias.clone()
            for expert_id, module in block.moe.local_experts():
                experts[(name, expert_id)] = {k: v.clone() for k, v in module.state_dict().items()}
    dense = {name: p.detach().clone() for name, p in model.named_parameters() if not is_expert_param(p)}
    # The conversion builds the expert groups once: every layer's copy of expert e is reduced over one group.
    shared = (len({id(getattr(p, "expert_dp_group", None)) for p in expert_parameters(model)}),
              len({e for _, e in experts}))
    return {"losses": losses, "dense": dense, "experts": experts, "biases": biases, "counts": counts,
            "groups": shared}


def _world(rank: int, world_size: int) -> dict:
    out: dict = {run: _train(rank, world_size, *run, STEPS, 0.0) for run in RUNS}
    # DDP's buffer broadcast before the second micro-batch's forward must leave each copy's counts alone (with
    # no_sync on the first micro-batch DDP would skip that broadcast: this is the harder case).
    out["bias"] = _train(rank, world_size, 2, "b", 1, BIAS_RATE, micro=MICRO)
    from largeep_plugin.hf import parallel_groups

    try:
        parallel_groups(3)
        out["bad_ep_size"] = "accepted"
    except ValueError as e:
        out["bad_ep_size"] = str(e)
    return out


def _reference(steps: int, world_size: int, micro: int = 1) -> tuple[torch.nn.Module, list[float], list]:
    """The unconverted model trained on one process on every rank's micro-batches at once; its losses and the
    first step's router logits per layer."""
    ref = tiny_model("mixtral", E).train()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=LR)
    losses, first_logits = [], []
    for step in range(steps):
        ids = torch.cat([_batch(step, r, m) for m in range(micro) for r in range(world_size)])
        if step == 0:  # a forward of its own: with output_router_logits the loss would include the aux loss
            with torch.no_grad():
                first_logits = list(ref(input_ids=ids, output_router_logits=True).router_logits)
        loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return ref, losses, first_logits


def _param_errors(ref: torch.nn.Module, got: dict) -> dict[str, float]:
    """Largest |converted - reference| of the dense parameters, the routers and the experts a rank holds."""
    from largeep_plugin.hf import FAMILIES
    from largeep_plugin.integrations.hf.weights import expert_from_hf

    mixtral = next(f for f in FAMILIES if f.name == "Mixtral")
    ref_params = dict(ref.named_parameters())
    errs = {"dense": 0.0, "router": 0.0, "experts": 0.0}
    seen = set()
    for name, value in got["dense"].items():
        key, kind = (name.replace(".moe.router.", ".gate."), "router") if ".moe.router." in name else (name, "dense")
        errs[kind] = max(errs[kind], float((value - ref_params[key].detach()).abs().max()))
        seen.add(key)
    for (block, expert_id), state in got["experts"].items():
        hf = ref.get_submodule(block).experts
        want = expert_from_hf(mixtral, lambda n, e: getattr(hf, n.split(".")[-1]).detach()[e], expert_id)
        errs["experts"] = max(errs["experts"], max(float((state[k] - w).abs().max()) for k, w in want.items()))
    unseen = [n for n in ref_params if n not in seen and ".experts." not in n]
    errs["dense params not compared"] = float(len(unseen))
    return errs


def test_recipes_train_like_the_unconverted_model() -> None:
    per_rank = world(_world, 4, timeout=240.0)
    ref, ref_losses, _ = _reference(STEPS, 4)
    bad = {}
    for run in RUNS:
        for rank, res in enumerate(per_rank):
            got = res[run]
            errs = {"loss": max(abs(a - b) for a, b in zip(got["losses"], ref_losses))}
            errs.update(_param_errors(ref, got))
            errs = {k: v for k, v in errs.items() if not v <= 1e-5}
            if errs:
                bad[f"EP {run[0]}, recipe ({run[1]}), rank {rank}"] = errs
    assert not bad, bad
    # With two copies, the layers share their expert groups: one per expert this rank holds, not per layer.
    assert all(res[(2, "a")]["groups"] == (2, 2) for res in per_rank), [res[(2, "a")]["groups"] for res in per_rank]
    # Each rank held E / EP experts; together the ranks of one copy held every expert.
    assert sorted(e for res in per_rank[:2] for _, e in res[(2, "a")]["experts"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    # Training moved every kind of parameter far beyond the tolerance: the comparison is not of a frozen model.
    init = dict(tiny_model("mixtral", E).named_parameters())
    moved = {kind: max(float((p.detach() - init[n].detach()).abs().max())
                       for n, p in ref.named_parameters() if kind in n)
             for kind in (".self_attn.", ".gate.", ".experts.")}
    assert min(moved.values()) > 1e-2, moved

    # One step of 2 micro-batches with a balancing bias, EP 2 x 2 copies under DDP: the parameters of the reference
    # trained on all 8 micro-batches at once; each copy's token counts of its own micro-batches (top-2 of the
    # reference's router scores; DDP broadcasts buffers before each forward); on every rank the bias
    # rate * sign(mean - count) of the counts summed over both copies.
    ref1, ref1_losses, first_logits = _reference(1, 4, micro=MICRO)
    for rank, res in enumerate(per_rank):
        errs = _param_errors(ref1, res["bias"])
        errs["loss"] = abs(res["bias"]["losses"][0] - ref1_losses[0])
        assert all(v <= 1e-5 for v in errs.values()), (rank, errs)
    for layer, logits in enumerate(first_logits):
        # [micro, rank, E]: the tokens of one rank's micro-batch are BATCH x SEQ consecutive rows of the logits
        per_batch = torch.nn.functional.one_hot(logits.softmax(-1).topk(2, dim=-1).indices, E).sum(1)
        per_batch = per_batch.reshape(MICRO, 4, BATCH * SEQ, E).sum(2)
        counts = per_batch.sum((0, 1)).float()
        want = BIAS_RATE * torch.sign(counts.mean() - counts)
        assert want.abs().sum() > 0
        for rank, res in enumerate(per_rank):
            name = f"model.layers.{layer}.mlp.moe"
            copy = slice(2 * (rank // 2), 2 * (rank // 2) + 2)   # EP 2: ranks [0, 1] and [2, 3]
            assert res["bias"]["counts"][name].tolist() == per_batch[:, copy].sum((0, 1)).tolist(), (rank, layer)
            got = res["bias"]["biases"][f"model.layers.{layer}.mlp"]
            assert torch.equal(got, want), (rank, layer, got, want)
    for res in per_rank:
        assert res["bad_ep_size"] == ("ep_size=3 does not divide the world size 4: the world is ep_size x "
                                      "data-parallel copies")


def test_example_runs_under_torchrun(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    save, monitor = tmp_path / "model", tmp_path / "load.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "examples/train_hf_torchrun.py", "--steps", "3", "--ddp", "--save", str(save),
               "--load-log", str(monitor)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "EP 2 x 1 data-parallel copies" in lines[0] and "DDP" in lines[0], lines
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/3", "2/3", "3/3"], lines
    assert len(monitor.read_text().splitlines()) == 3 * 2   # 3 steps x 2 MoE layers
    saved = AutoModelForCausalLM.from_pretrained(str(save))
    assert saved.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2   # both ranks' experts, gathered
