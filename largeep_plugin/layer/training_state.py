"""The whole training state of a model with large-EP layers, stored by *logical* expert: any EP size resumes it.

    save_training_state(path, model, optimizer, extra={"step": step})   # collective, after the optimizer step
    extra = load_training_state(path, model, optimizer)                 # collective, on the model built anew

``optimizer`` is a torch optimizer (the layer and the Hugging Face torchrun route), or a route's ``StateAccess``
(``expert_state.py``; DeepSpeed's engine: ``integrations/deepspeed/training_state.py``): the files are the same
whichever route wrote them.

The directory ``path``:

    meta.json                  the format, the world size, and per large-EP layer its experts, EP size, which
                               experts each EP rank held (``home``, moves included) and its EP groups' ranks
    dense.pt                   (global rank 0) every tensor that is the same on every rank, under the model's
                               names: parameters (attention, embeddings, routers, shared experts) with their
                               optimizer state and parameter group, and persistent buffers (each layer's balancing
                               bias ``router.expert_bias``); the optimizer's parameter groups (hyper-parameters)
    experts/<layer>.experts.<e>.pt
                               (the lowest global rank that holds expert e) expert e's tensors and their optimizer
                               state: each logical expert once, whichever ranks, replicas or data-parallel copies
                               hold it; clones are never stored (they are copies)
    ranks/<rank>.pt            (every rank) what one rank's EP group keeps: each layer's load since the last bias
                               update and of the global batch, the clones' load average and plan, the moves' window,
                               and the rank's random number generator state
    extra.pt                   (global rank 0) ``extra``, the caller's (a scheduler's state, the step, the data
                               position)

Loading into the same world and EP layout restores everything as it was (bit for bit on CPU: the run goes on as
if it never stopped; a layout that moves made is restored too). Loading into another EP size (fewer or more ranks,
experts colocated or replicated, another data-parallel split) reads each expert this rank holds from its file and
rebuilds what belonged to the old EP groups: the counts since the last bias update are summed over the old groups
and given to the new first copy (the next bias update sums the copies again: the same bias); the global-batch
counts, the same in every copy, go to every copy; the clones' load average is averaged over the old groups and
the clones are planned afresh from it; the moves' window starts empty; random number generators are not restored
(the ranks are not the same processes). The next steps equal a run that never stopped up to the order of
floating-point sums (``tests/test_training_state.py``).

A save writes into ``<path>.partial`` and, when every rank has written, renames an older ``path`` to
``<path>.old``, ``<path>.partial`` to ``path`` and removes ``<path>.old``: a kill at any moment leaves a complete
checkpoint under ``path`` (or, between the two renames, under ``<path>.old``, which ``load_training_state``
takes then). Every rank must see ``path`` (one file system).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import settle
from .expert_state import State, StateAccess, access_of

FORMAT = "largeep-training-state"
VERSION = 1
META = "meta.json"


# ---- the model's logical names ------------------------------------------------------------------------------------

def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every large-EP layer (modules with ``local_experts`` and ``home_layout``), model order."""
    return [(name, m) for name, m in model.named_modules()
            if callable(getattr(m, "local_experts", None)) and callable(getattr(m, "home_layout", None))]


def _expert_names(model: nn.Module) -> dict[int, tuple[str, str]]:
    """{id(expert tensor): (the expert's key, tensor name)} of every local expert's parameters and buffers."""
    out = {}
    for layer_name, layer in _layers(model):
        for expert_id, module in layer.local_experts():
            for tensor_name, t in list(module.named_parameters()) + list(module.named_buffers()):
                out[id(t)] = (_expert_key(layer_name, layer, expert_id), tensor_name)
    return out


def _per_group_tensors(model: nn.Module) -> set[int]:
    """ids of the persistent tensors that belong to one EP group, not to the model (the clones' load history and
    plan): kept in the ranks' files."""
    out: set[int] = set()
    for _, layer in _layers(model):
        clones = getattr(layer, "clones", None)
        if clones is not None:
            out |= {id(t) for t in clones.buffers()}
    return out


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) of every buffer a state dict holds, under the modules' own names (not a state-dict hook's:
    DeepSpeed's stock names change the keys, never these)."""
    for module_name, module in model.named_modules():
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), t


def _expert_key(layer_name: str, layer: nn.Module, expert: int) -> str:
    """The logical name of one expert of a layer (its file's name): ``<layer>.experts.<e>``, and with expert
    tensor parallelism one per shard, ``<layer>.experts.<e>.shard<j>``."""
    key = f"{layer_name}.experts.{expert}" if layer_name else f"experts.{expert}"
    tp_size = int(getattr(layer, "tp_size", 1))
    return key + (f".shard{layer.tp_rank}" if tp_size > 1 else "")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        settle()  # not dist.barrier(): it would hold earlier object collectives' work (comm.settle)


def _group_ranks(group: Any) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    return list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def _all_gather(obj: Any) -> list[Any]:
    if _rank_world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * _rank_world()[1]
    dist.all_gather_object(out, obj)
    return out


def _params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(logical name, parameter) in model order: the model's name for a dense parameter, ``<layer>.experts.<e>.
    <tensor>`` for an expert's. The order is the same on every rank (every rank holds the same structure)."""
    experts = _expert_names(model)
    for name, p in model.named_parameters():
        if id(p) in experts:
            key, tensor = experts[id(p)]
            yield f"{key}.{tensor}", p
        else:
            yield name, p


def _group_index(access: StateAccess, p: nn.Parameter) -> int | None:
    """The optimizer group of ``p``: the access's own answer where it has one (a route whose optimizer steps
    flat copies, not the model's parameters), else the group of the access's torch optimizer holding ``p``."""
    if callable(getattr(access, "group_index", None)):
        return access.group_index(p)
    groups = getattr(getattr(access, "optimizer", None), "param_groups", None)
    if groups is None:
        return None
    for g, group in enumerate(groups):
        if any(q is p for q in group["params"]):
            return g
    return None


# ---- save ---------------------------------------------------------------------------------------------------------

def save_training_state(path: str | os.PathLike[str], model: nn.Module, optimizer: Any = None,
                        extra: Any = None) -> str:
    """Write the training state of ``model`` and ``optimizer`` (a torch optimizer, a route's ``StateAccess``, or
    None for the weights alone) to the directory ``path`` (module docstring). Collective: every rank calls it,
    after the optimizer step and the bias update. Returns ``path``."""
    path = os.fspath(path).rstrip("/")
    model = _unwrap(model)
    access = access_of(optimizer)
    rank, world = _rank_world()
    partial = path + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        for sub in ("experts", "ranks"):
            os.makedirs(os.path.join(partial, sub))
    layers = _layers(model)
    expert_of = _expert_names(model)
    everyone = _all_gather(sorted({key for key, _ in expert_of.values()}))
    writer = {}   # expert key -> the lowest global rank that holds it
    for r in reversed(range(world)):
        for key in everyone[r]:
            writer[key] = r
    _barrier()   # the directory exists
    experts: dict[str, dict[str, Any]] = {}
    dense: dict[str, Any] = {"tensors": {}, "optimizer": {}, "group_of": {}}
    # Every rank reads every parameter in model order (a route may gather it collectively, ZeRO); each keeps what
    # it writes.
    for name, p in _params(model):
        state = access.read(p, grad=False)
        where = expert_of.get(id(p))
        if where is None:
            if rank == 0:
                _keep(dense, name, state, _group_index(access, p))
            continue
        key, tensor = where
        if writer[key] == rank:
            _keep(experts.setdefault(key, {"tensors": {}, "optimizer": {}, "group_of": {}}), tensor, state,
                  _group_index(access, p))
    for key, content in experts.items():
        torch.save(content, os.path.join(partial, "experts", f"{key}.pt"))
    if rank == 0:
        skip = set(expert_of) | _per_group_tensors(model)
        dense["buffers"] = {name: t.detach().cpu().clone() for name, t in _persistent_buffers(model)
                            if id(t) not in skip}
        groups = getattr(getattr(access, "optimizer", None), "param_groups", None)
        dense["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in groups or []]
        torch.save(dense, os.path.join(partial, "dense.pt"))
        torch.save(extra, os.path.join(partial, "extra.pt"))
    torch.save(_rank_state(model), os.path.join(partial, "ranks", f"{rank}.pt"))
    layer_meta = {name: {"num_experts": layer.config.num_experts, "ep_size": layer.ep_size,
                         "expert_tp_degree": int(getattr(layer, "tp_size", 1)),
                         "home": [list(h) for h in layer.home_layout()]} for name, layer in layers}
    groups_of = _all_gather({name: _group_ranks(layer.ep_group) for name, layer in layers})
    for name in layer_meta:
        layer_meta[name]["ep_groups"] = sorted({tuple(g[name]) for g in groups_of})
    _barrier()   # every rank has written
    if rank == 0:
        with open(os.path.join(partial, META), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "world_size": world, "layers": layer_meta}, f)
        _publish(partial, path)
    _barrier()
    return path


def _keep(into: dict[str, Any], name: str, state: State, group: int | None) -> None:
    into["tensors"][name] = _cpu(state["param"])
    into["optimizer"][name] = {k[len("optim."):]: _cpu(v) for k, v in state.items() if k.startswith("optim.")}
    if group is not None:
        into["group_of"][name] = group


def _cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def _rank_state(model: nn.Module) -> dict[str, Any]:
    """What one rank's EP group keeps per layer (module docstring), and the rank's random number generators."""
    layers = {}
    for name, layer in _layers(model):
        entry: dict[str, Any] = {"ep_ranks": _group_ranks(layer.ep_group)}
        for b in ("tokens_per_expert_since_update", "global_batch_tokens_E"):
            if hasattr(layer, b):
                entry[b] = getattr(layer, b).detach().cpu().clone()
        clones = getattr(layer, "clones", None)
        if clones is not None:
            entry["clones"] = {k: v.detach().cpu().clone() for k, v in clones.state_dict().items()}
            entry["clones_steps"] = clones.steps
        moves = getattr(layer, "moves", None)
        if moves is not None:
            entry["moves"] = {"coact_EE": moves.coact_EE.cpu().clone(), "sent_N": moves.sent_N.cpu().clone(),
                              "steps": moves.steps}
        layers[name] = entry
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None:
        rng[accelerator.type] = torch.get_device_module(accelerator.type).get_rng_state_all()
    return {"layers": layers, "rng": rng}


def _publish(partial: str, path: str) -> None:
    """``<path>.partial`` becomes ``path``; an older ``path`` goes to ``<path>.old`` for the moment in between."""
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)


# ---- load ---------------------------------------------------------------------------------------------------------

def checkpoint_dir(path: str | os.PathLike[str]) -> str:
    """The complete checkpoint at ``path``: ``path`` itself, or ``<path>.old`` when a save was killed between
    its two renames. ValueError when there is none."""
    path = os.fspath(path).rstrip("/")
    for candidate in (path, path + ".old"):
        if os.path.exists(os.path.join(candidate, META)):
            return candidate
    raise ValueError(f"load_training_state: {path!r} holds no training state (no {META}, nor in {path}.old)")


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of the checkpoint at ``path`` (``checkpoint_dir``), checked."""
    with open(os.path.join(checkpoint_dir(path), META), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"load_training_state: {os.fspath(path)!r} has format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}; this code reads {FORMAT!r} version {VERSION}")
    return meta


def load_training_state(path: str | os.PathLike[str], model: nn.Module, optimizer: Any = None) -> Any:
    """Read what ``save_training_state`` wrote into ``model`` (built with any EP size: its large-EP layers hold
    some experts each) and ``optimizer`` (built on it with the same parameter groups; a route's ``StateAccess``;
    None: weights only). Collective. Returns the ``extra`` that was saved.

    Raises:
        ValueError: no checkpoint at ``path``; a layer the checkpoint lacks, or with another expert count; an
            expert file missing; a parameter the checkpoint lacks, or in another optimizer group than when saved.
    """
    directory = checkpoint_dir(path)
    meta = read_meta(directory)
    model = _unwrap(model)
    access = access_of(optimizer)
    rank, world = _rank_world()
    layers = _layers(model)
    saved_layers = meta["layers"]
    for name, layer in layers:
        saved = saved_layers.get(name)
        if saved is None:
            raise ValueError(f"load_training_state: the model's large-EP layer {name!r} is not in {directory!r} "
                             f"(it has {sorted(saved_layers)})")
        if saved["num_experts"] != layer.config.num_experts:
            raise ValueError(f"load_training_state: layer {name!r} has num_experts={layer.config.num_experts}, the "
                             f"checkpoint {saved['num_experts']}")
        tp_size = int(getattr(layer, "tp_size", 1))
        if saved.get("expert_tp_degree", 1) != tp_size:
            raise NotImplementedError(f"load_training_state: layer {name!r} has expert_tp_degree={tp_size}, the "
                                      f"checkpoint {saved.get('expert_tp_degree', 1)}: an expert's shards are "
                                      "stored as they were split; resume with the same expert_tp_degree")
    same = _same_layout(meta, layers, world)
    if same:   # the layout the save ran on, moves included
        for name, layer in layers:
            home = tuple(tuple(h) for h in saved_layers[name]["home"])
            if home != layer.home_layout():
                layer.relabel_homes(home)
    dense = torch.load(os.path.join(directory, "dense.pt"), weights_only=True)
    expert_files: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        for e in layer.expert_ids:
            key = _expert_key(name, layer, e)
            file = os.path.join(directory, "experts", f"{key}.pt")
            if not os.path.exists(file):
                raise ValueError(f"load_training_state: {directory!r} has no expert {e} of layer {name!r} "
                                 f"(file experts/{key}.pt)")
            expert_files[key] = torch.load(file, weights_only=True)
    expert_of = _expert_names(model)
    for name, p in _params(model):
        where = expert_of.get(id(p))
        source, tensor = (dense, name) if where is None else (expert_files[where[0]], where[1])
        if tensor not in source["tensors"]:
            raise ValueError(f"load_training_state: {directory!r} lacks parameter {name}")
        group, saved_group = _group_index(access, p), source["group_of"].get(tensor)
        if group is not None and saved_group is not None and group != saved_group:
            raise ValueError(f"load_training_state: {name} is in optimizer group {group}, but was saved in group "
                             f"{saved_group}")
        state = {"param": source["tensors"][tensor]}
        state.update({f"optim.{k}": v for k, v in source["optimizer"].get(tensor, {}).items()})
        access.write(p, state)
    _load_buffers(model, dense["buffers"], expert_of)
    groups = getattr(getattr(access, "optimizer", None), "param_groups", None)
    if groups is not None and dense.get("param_groups"):
        if len(groups) != len(dense["param_groups"]):
            raise ValueError(f"load_training_state: the optimizer has {len(groups)} parameter groups, the "
                             f"checkpoint {len(dense['param_groups'])}")
        for group, saved in zip(groups, dense["param_groups"]):
            # A group's name is which group it is, not a hyper-parameter (DeepSpeed names its expert groups by the
            # EP size, which a resume may change).
            group.update({k: v for k, v in saved.items() if k != "name"})
    _load_rank_state(directory, model, meta, same, rank)
    extra = torch.load(os.path.join(directory, "extra.pt"), weights_only=False)
    _barrier()
    return extra


def _same_layout(meta: Mapping[str, Any], layers: list[tuple[str, nn.Module]], world: int) -> bool:
    """Whether the model runs on the world and EP groups it was saved from (then per-rank state is restored)."""
    if meta["world_size"] != world:
        return False
    for name, layer in layers:
        saved = meta["layers"][name]
        if saved["ep_size"] != layer.ep_size or tuple(_group_ranks(layer.ep_group)) not in {
                tuple(g) for g in saved["ep_groups"]}:
            return False
        if [len(h) for h in saved["home"]] != [len(h) for h in layer.home_layout()]:
            return False
    return True


@torch.no_grad()
def _load_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor], expert_of: Mapping[int, Any]) -> None:
    skip = set(expert_of) | _per_group_tensors(model)
    for name, t in _persistent_buffers(model):
        if id(t) in skip:
            continue
        if name not in saved:
            raise ValueError(f"load_training_state: the checkpoint lacks buffer {name}")
        t.copy_(saved[name])


@torch.no_grad()
def _load_rank_state(directory: str, model: nn.Module, meta: Mapping[str, Any], same: bool, rank: int) -> None:
    """The per-EP-group state: this rank's own file when the layout is the same, else rebuilt from one file per
    old EP group (module docstring)."""
    layers = _layers(model)
    if same:
        state = torch.load(os.path.join(directory, "ranks", f"{rank}.pt"), weights_only=True)
        for name, layer in layers:
            _restore_layer(layer, state["layers"][name])
        torch.set_rng_state(state["rng"]["cpu"])
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is not None and accelerator.type in state["rng"]:
            torch.get_device_module(accelerator.type).set_rng_state_all(state["rng"][accelerator.type])
        return
    # One rank file per old EP group of each layer (its first rank's); which copy this rank's new group is.
    firsts = sorted({g[0] for name in meta["layers"] for g in meta["layers"][name]["ep_groups"]})
    files = {r: torch.load(os.path.join(directory, "ranks", f"{r}.pt"), weights_only=True) for r in firsts}
    groups_now = _all_gather({name: _group_ranks(layer.ep_group) for name, layer in layers})
    for name, layer in layers:
        old = [files[g[0]]["layers"][name] for g in meta["layers"][name]["ep_groups"]]
        mine = _group_ranks(layer.ep_group)
        first_copy = mine[0] == min(g[name][0] for g in groups_now)
        since = sum(o["tokens_per_expert_since_update"] for o in old)
        layer.tokens_per_expert_since_update.copy_(since if first_copy else torch.zeros_like(since))
        batches = [o["global_batch_tokens_E"] for o in old]
        if all(torch.equal(b, batches[0]) for b in batches):
            layer.global_batch_tokens_E.copy_(batches[0])       # summed over the copies already: every copy's
        else:
            total = sum(batches)
            layer.global_batch_tokens_E.copy_(total if first_copy else torch.zeros_like(total))
        clones = getattr(layer, "clones", None)
        emas = [o["clones"]["load_ema_E"] for o in old if "clones" in o]
        if clones is not None:
            clones.steps = old[0].get("clones_steps", 0)
            if emas and float(sum(emas).sum()) > 0:
                clones.replan_from(sum(emas) / len(emas))
        moves = getattr(layer, "moves", None)
        if moves is not None and "moves" in old[0]:
            moves.steps = old[0]["moves"]["steps"]   # the decisions keep their schedule; the window starts empty


def _restore_layer(layer: nn.Module, entry: Mapping[str, Any]) -> None:
    for b in ("tokens_per_expert_since_update", "global_batch_tokens_E"):
        if b in entry and hasattr(layer, b):
            getattr(layer, b).copy_(entry[b])
    clones = getattr(layer, "clones", None)
    if clones is not None and "clones" in entry:
        clones.load_state_dict(entry["clones"])
        clones.steps = entry["clones_steps"]
    moves = getattr(layer, "moves", None)
    if moves is not None and "moves" in entry:
        moves.coact_EE.copy_(entry["moves"]["coact_EE"])
        moves.sent_N.copy_(entry["moves"]["sent_N"])
        moves.steps = entry["moves"]["steps"]
