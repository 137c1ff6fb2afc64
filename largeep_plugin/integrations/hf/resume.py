"""Save and load the whole training state of a model with large-EP layers, so that a run resumes exactly.

    save_training_state(path, model, optimizer, extra={"step": step})   # collective, after optimizer.step()
    extra = load_training_state(path, model, optimizer)                 # collective, on the rebuilt model

What a resumed run needs, and where it goes in the directory ``path``:

    dense.pt                  (global rank 0) the dense tensors of ``model.state_dict()`` (the same on every rank:
                              attention, embeddings, routers, shared experts, and persistent buffers such as each
                              layer's balancing bias ``router.expert_bias``), their optimizer state, the optimizer's
                              parameter groups (hyper-parameters and which tensors each holds, by name) and
                              ``extra`` (the caller's: a scheduler's state, the step, the data position)
    experts/<layer>.<e>.pt    (the one holder that counts expert e, ``grads.counted_here``) expert e's tensors and
                              their optimizer state; each logical expert once, whichever ranks and copies hold it
                              (with expert TP, one file per shard: ``<layer>.<e>.shard<j>.pt``)
    ranks/<rank>.pt           (every rank) what belongs to one rank: its layers' load history since the last bias
                              update (the counts of the bias update and of the global-batch loss, which differ
                              between data-parallel copies) and its random number generator states
    meta.json                 the world size and the format

Names are logical: an expert's tensor is ``<layer>.experts.<e>.<tensor>`` (``fc1.weight``...) whatever slot holds
it, so the model and optimizer state load onto any layout that holds the same experts (another EP size too, where
the ranks files are then only read when the world size is the same; a different world refuses a non-empty load
history). A save writes into ``<path>.partial`` and renames it to ``path`` when every rank has written: a
directory that exists is always a complete save. Every rank must see ``path`` (one file system).

Reloading with the same world, layout and optimizer gives the run bit for bit (CPU): 3 steps + save + restart + 3
steps equal 6 steps straight (``tests/test_hf_resume.py``).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from largeep_plugin.layer.comm import settle
from largeep_plugin.layer.grads import counted_here
from largeep_plugin.layer.moe_layer import LargeEPMoE, moe_layers

FORMAT = 1
# A layer's load history: its counts since the last bias update and of the global batch so far (int64 [E] buffers,
# not in its state dict: they differ between data-parallel copies).
LOAD_HISTORY = ("tokens_per_expert_since_update", "global_batch_tokens_E")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        settle()  # not dist.barrier(): it would hold earlier object collectives' work (comm.settle)


def _expert_keys(model: nn.Module) -> dict[str, tuple[str, str, nn.Module, LargeEPMoE]]:
    """{state-dict prefix of a local expert module: (logical key, layer name, module, layer)}."""
    where = {id(m): name for name, m in model.named_modules()}
    out = {}
    for layer_name, layer in moe_layers(model):
        for expert_id, module in layer.local_experts():
            key = f"{layer_name}.experts.{expert_id}" if layer_name else f"experts.{expert_id}"
            if layer.tp_size > 1:
                key += f".shard{layer.tp_rank}"
            out[where[id(module)] + "."] = (key, layer_name, module, layer)
    return out


def _logical_names(model: nn.Module) -> dict[int, str]:
    """{id(parameter): its logical name}: the model's name for dense parameters, ``<expert key>.<tensor>`` for an
    expert's."""
    names = {id(p): n for n, p in model.named_parameters()}
    for prefix, (key, _, module, _) in _expert_keys(model).items():
        for tensor, p in module.named_parameters():
            names[id(p)] = f"{key}.{tensor}"
    return names


def _optimizer_layout(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[int, int, str]]:
    """(index in ``optimizer.state_dict()``, group index, logical name) of every parameter the optimizer holds."""
    names = _logical_names(model)
    out, index = [], 0
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"optimizer parameter group {g} holds a tensor {tuple(p.shape)} that is not a "
                                 "parameter of the model")
            out.append((index, g, names[id(p)]))
            index += 1
    return out


def _atomic_dir(path: str) -> str:
    """Rank 0 makes ``<path>.partial`` empty; every rank then writes there."""
    partial = path.rstrip("/") + ".partial"
    if _rank_world()[0] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        for sub in ("experts", "ranks"):
            os.makedirs(os.path.join(partial, sub))
    _barrier()
    return partial


def _publish(partial: str, path: str) -> None:
    """After every rank has written: ``<path>.partial`` becomes ``path`` (an older save there is removed)."""
    _barrier()
    if _rank_world()[0] == 0:
        old = path.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def save_training_state(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict[str, Any] | None = None) -> None:
    """Write the training state of ``model`` (not a DDP wrapper: the module inside) and ``optimizer`` to
    ``path`` (module docstring). Collective: every rank calls it, after the optimizer step and the bias update."""
    path = os.fspath(path)
    rank, world = _rank_world()
    partial = _atomic_dir(path)
    experts = _expert_keys(model)
    layout = _optimizer_layout(model, optimizer)
    opt = optimizer.state_dict()
    state_of = {name: opt["state"].get(index) for index, _, name in layout}
    group_of = {name: g for _, g, name in layout}
    expert_prefixes = tuple(experts)
    lowest: dict[int, int] = {}
    for prefix, (key, _, module, _) in experts.items():
        params = list(module.parameters())
        if params and not counted_here(params[0], rank, lowest=lowest):
            continue
        tensors = {n: t.detach().clone() for n, t in module.state_dict().items()}
        names = {n: f"{key}.{n}" for n in tensors}
        torch.save({"tensors": tensors,
                    "optimizer": {n: state_of.get(full) for n, full in names.items() if full in group_of},
                    "groups": {n: group_of[full] for n, full in names.items() if full in group_of}},
                   os.path.join(partial, "experts", f"{key}.pt"))
    if rank == 0:
        dense = {k: v for k, v in model.state_dict().items() if not k.startswith(expert_prefixes)}
        expert_names = {full for full in group_of if any(full.startswith(key + ".") for key, *_ in experts.values())}
        groups = [{k: v for k, v in group.items() if k != "params"} for group in opt["param_groups"]]
        torch.save({"model": dense, "groups": groups,
                    "optimizer": {n: state_of[n] for n in group_of if n not in expert_names},
                    "dense_groups": {n: g for n, g in group_of.items() if n not in expert_names},
                    "extra": extra}, os.path.join(partial, "dense.pt"))
        with open(os.path.join(partial, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "world_size": world}, f)
    load = {name: {b: getattr(layer, b).clone() for b in LOAD_HISTORY} for name, layer in moe_layers(model)}
    torch.save({"load": load, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(partial, "ranks", f"{rank}.pt"))
    _publish(partial, path)


def load_training_state(path: str | os.PathLike[str], model: nn.Module,
                        optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
    """Read what ``save_training_state`` wrote into ``model`` (converted, with the experts the rank holds) and
    ``optimizer`` (built on it, the same parameter groups; None: weights only). Collective. Returns ``extra``.

    Raises:
        ValueError: no save at ``path``, an expert of this rank missing from it, a parameter in another optimizer
            group than when saved, or a non-empty load history saved by a world of another size.
    """
    path = os.fspath(path)
    rank, world = _rank_world()
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"load_training_state: {path!r} holds no training state (no meta.json)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_training_state: {path!r} has format {meta.get('format')!r}, this code reads {FORMAT}")
    dense = torch.load(os.path.join(path, "dense.pt"), weights_only=False)
    state = dict(dense["model"])
    saved_opt: dict[str, Any] = dict(dense["optimizer"])
    saved_group: dict[str, int] = dict(dense["dense_groups"])
    for prefix, (key, _, module, _) in _expert_keys(model).items():
        file = os.path.join(path, "experts", f"{key}.pt")
        if not os.path.exists(file):
            raise ValueError(f"load_training_state: {path!r} has no expert {key} (file experts/{key}.pt)")
        saved = torch.load(file, weights_only=False)
        state.update({prefix + n: t for n, t in saved["tensors"].items()})
        saved_opt.update({f"{key}.{n}": s for n, s in saved["optimizer"].items()})
        saved_group.update({f"{key}.{n}": g for n, g in saved["groups"].items()})
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        layout = _optimizer_layout(model, optimizer)
        opt = optimizer.state_dict()
        if len(dense["groups"]) != len(opt["param_groups"]):
            raise ValueError(f"load_training_state: the optimizer has {len(opt['param_groups'])} parameter groups, "
                             f"the save {len(dense['groups'])}")
        opt["state"] = {}
        for index, g, name in layout:
            if saved_group.get(name, g) != g:
                raise ValueError(f"load_training_state: {name} is in optimizer group {g}, but was saved in group "
                                 f"{saved_group[name]}")
            if saved_opt.get(name) is not None:
                opt["state"][index] = saved_opt[name]
        for group, saved in zip(opt["param_groups"], dense["groups"]):
            group.update(saved)
        optimizer.load_state_dict(opt)
    mine = os.path.join(path, "ranks", f"{rank}.pt")
    if meta["world_size"] == world:
        ranks = torch.load(mine, weights_only=False)
        layers = dict(moe_layers(model))
        with torch.no_grad():
            for name, saved in ranks["load"].items():
                for b, t in saved.items():
                    getattr(layers[name], b).copy_(t)
        torch.set_rng_state(ranks["rng"])
        if ranks["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ranks["cuda_rng"])
    else:
        ranks = torch.load(os.path.join(path, "ranks", "0.pt"), weights_only=False)
        busy = [f"{name}.{b}" for name, saved in ranks["load"].items() for b, t in saved.items() if bool(t.any())]
        if busy:
            raise ValueError(f"load_training_state: saved by a world of {meta['world_size']} ranks with a load "
                             f"history since the last bias update ({busy[0]}...); resume in that world, or save "
                             "right after a bias update")
    _barrier()
    return dense["extra"]
