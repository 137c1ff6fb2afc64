"""The ``"large_ep"`` section of a DeepSpeed JSON config, read strictly.

DeepSpeed keeps an unknown *top-level* key in its raw config dict, so the plugin's settings live in one top-level
section (never ``"expert_parallel"``: that key switches on DeepSpeed's own AutoEP)::

    "large_ep": {
        "enabled": true,
        "ep_size": 16,                    # ranks per expert-parallel group = experts per MoE layer, or "auto"
        "data_parallel_copies": null,     # copies of the EP group; null: world size / ep_size
        "top_k": null,                    # null: keep the stock layer's k
        "score_function": "softmax",      # "softmax" (the stock gate's) or "sigmoid"
        "capacity_factor": null,          # null: dropless
        "allow_colocate": false,          # Hugging Face models: more experts than ep_size, several per rank
        "dynamic_replicas": 0,            # spare expert slots per rank for clones of hot experts (0 = off)
        "rebalance_every": 1,             # re-plan the clones every N optimizer steps (refreshed every step)
        "rebalance_decay": 0.5,           # the planner's load: EMA over steps
        "rebalance_margin": 0.02,         # hysteresis: keep a plan unless a new one is better by this much
        "replace_every": 0,               # move home experts with their state every N steps when worth it (0 = off;
                                          # Hugging Face models under DeepSpeed; not on the Megatron-LM route)
        "replace_margin": 0.05,           # the busiest inter-node link's share a new layout must save
        "placement": {"topology_file": null, "load_file": null},
        "overlap": {"chunks": 1, "dispatch": "flat", "ranks_per_node": null},
        "load_balance": {"bias_update_rate": 0.001, "aux_loss_coeff": 0.0, "z_loss_coeff": 0.0},
        "monitor": {"jsonl_path": null, "tensorboard_dir": null}
    }

Every key is optional except ``ep_size`` when ``enabled`` is true. ``"auto"`` is resolved by ``resolve_ep_size``
once the world is known (one config then serves 4 and 16 processes alike). A misspelt key anywhere is a
``ValueError`` naming it and listing the valid keys; a wrong type or an impossible value names the key path and
the value.
This module does not import DeepSpeed: a config can be checked anywhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

from largeep_plugin.layer.config import DISPATCH_KINDS, SCORE_FUNCTIONS
from largeep_plugin.placement.files import read_json

SECTION = "large_ep"
AUTO = "auto"
AUTOEP_SECTION = "expert_parallel"  # DeepSpeed's own AutoEP: converts the same Hugging Face blocks


@dataclass(frozen=True, kw_only=True)
class PlacementSection:
    """Where experts go: a topology YAML and a measured load (``largeep demo --record-load``) file."""

    topology_file: str | None = None
    load_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class OverlapSection:
    """How tokens travel: chunks of the overlap pipeline (1 = none), the all-to-all kind, and (for
    ``"hierarchical"``) the ranks of one node, consecutive in the EP group (None: from the placement's topology,
    else the ``LOCAL_WORLD_SIZE`` environment variable; see ``deepspeed_placement.resolve_ranks_per_node``)."""

    chunks: int = 1
    dispatch: str = "flat"
    ranks_per_node: int | None = None


@dataclass(frozen=True, kw_only=True)
class LoadBalanceSection:
    """The aux-loss-free bias step and the optional balancing losses."""

    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MonitorSection:
    """Per-step load export: a JSON-lines file (rank 0) and a TensorBoard directory."""

    jsonl_path: str | None = None
    tensorboard_dir: str | None = None


@dataclass(frozen=True, kw_only=True)
class LargeEPSection:
    """The parsed ``"large_ep"`` section. ``enabled=False`` (or no section) leaves the model stock."""

    enabled: bool = False
    ep_size: int | str | None = None
    data_parallel_copies: int | None = None
    top_k: int | None = None
    score_function: str = "softmax"
    capacity_factor: float | None = None
    allow_colocate: bool = False
    dynamic_replicas: int = 0
    rebalance_every: int = 1
    rebalance_decay: float = 0.5
    rebalance_margin: float = 0.02
    replace_every: int = 0
    replace_margin: float = 0.05
    placement: PlacementSection = field(default_factory=PlacementSection)
    overlap: OverlapSection = field(default_factory=OverlapSection)
    load_balance: LoadBalanceSection = field(default_factory=LoadBalanceSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)

    @property
    def group_name(self) -> str:
        """DeepSpeed's name of the expert-parallel group (and of the expert parameters' ``group_name``)."""
        if not isinstance(self.ep_size, int):
            raise ValueError(f"{SECTION}.ep_size={self.ep_size!r} is not resolved yet: call resolve_ep_size first")
        return f"ep_size_{self.ep_size}"


_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_SUBSECTIONS: dict[str, type] = {
    "placement": PlacementSection,
    "overlap": OverlapSection,
    "load_balance": LoadBalanceSection,
    "monitor": MonitorSection,
}
# Accepted JSON types per key path; None is accepted where the default is None.
_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": _BOOL, "ep_size": _INT, "data_parallel_copies": _INT, "top_k": _INT, "score_function": _STR,
    "capacity_factor": _FLOAT, "allow_colocate": _BOOL, "dynamic_replicas": _INT, "rebalance_every": _INT,
    "rebalance_decay": _FLOAT, "rebalance_margin": _FLOAT, "replace_every": _INT,
    "replace_margin": _FLOAT,
    "placement.topology_file": _STR, "placement.load_file": _STR,
    "overlap.chunks": _INT, "overlap.dispatch": _STR, "overlap.ranks_per_node": _INT,
    "load_balance.bias_update_rate": _FLOAT, "load_balance.aux_loss_coeff": _FLOAT,
    "load_balance.z_loss_coeff": _FLOAT,
    "monitor.jsonl_path": _STR, "monitor.tensorboard_dir": _STR,
}
# Words accepted besides the JSON types above.
_WORDS: dict[str, tuple[str, ...]] = {"ep_size": (AUTO,)}


def parse_large_ep_section(section: Any) -> LargeEPSection:
    """Parse the value of the ``"large_ep"`` key (None = no section = disabled)."""
    if section is None:
        return LargeEPSection()
    values = _read_mapping(SECTION, section, LargeEPSection)
    for name, cls in _SUBSECTIONS.items():
        if name in values:
            values[name] = cls(**_read_mapping(f"{SECTION}.{name}", values[name], cls))
    parsed = LargeEPSection(**values)
    _check_values(parsed)
    return parsed


def large_ep_section_from_config(config: Any) -> LargeEPSection:
    """The parsed section of a whole DeepSpeed config: a dict, or a path to a JSON file."""
    return parse_large_ep_section(load_ds_config(config).get(SECTION))


def check_top_level_keys(config: Mapping[str, Any], own_keys: Collection[str] = ()) -> None:
    """ValueError for a top-level key that is not DeepSpeed's own (``own_keys``) but close to ``"large_ep"``
    (``"large-ep"``, ``"largeep"``, ``"large_EP"``, ``"larg_ep"``): DeepSpeed keeps unknown top-level keys without
    a word, so a misspelt section would be a silent stock run. Also refuses ``"large_ep"`` together with an enabled
    ``"expert_parallel"`` (DeepSpeed's AutoEP): both would convert the same MoE blocks."""
    for key in config:
        if not isinstance(key, str) or key == SECTION or key in own_keys:
            continue
        if difflib.get_close_matches(key.lower().replace("-", "_"), [SECTION], n=1, cutoff=0.8):
            raise ValueError(f"the DeepSpeed config has a top-level key {key!r}: did you mean {SECTION!r}? "
                             f"(DeepSpeed ignores unknown top-level keys, so the run would silently stay stock)")
    autoep = config.get(AUTOEP_SECTION)
    if isinstance(autoep, Mapping) and autoep.get("enabled") and parse_large_ep_section(config.get(SECTION)).enabled:
        raise ValueError(f"the DeepSpeed config enables both {AUTOEP_SECTION!r} (DeepSpeed's AutoEP) and {SECTION!r}: "
                         "both convert the model's MoE blocks, enable one of them")


# The one mapping of the section onto ``LargeEPConfig``: (key path in the section, LargeEPConfig field).
LAYER_FIELDS: tuple[tuple[str, str], ...] = (
    ("top_k", "top_k"), ("score_function", "score_function"), ("capacity_factor", "capacity_factor"),
    ("load_balance.bias_update_rate", "bias_update_rate"), ("load_balance.aux_loss_coeff", "aux_loss_coeff"),
    ("load_balance.z_loss_coeff", "z_loss_coeff"), ("overlap.chunks", "overlap_chunks"),
    ("overlap.dispatch", "dispatch"), ("dynamic_replicas", "dynamic_replicas"),
    ("rebalance_every", "rebalance_every"), ("rebalance_decay", "rebalance_decay"),
    ("rebalance_margin", "rebalance_margin"), ("replace_every", "replace_every"),
    ("replace_margin", "replace_margin"),
)


def layer_fields(section: LargeEPSection, written: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``LargeEPConfig`` fields the section gives (``{field: value}``; a null value, "keep the model's", is
    left out). ``written``: the raw section; then only the keys the user wrote count, so a default of the section
    never contradicts the model's or the framework's own settings."""
    out: dict[str, Any] = {}
    for path, name in LAYER_FIELDS:
        head, _, leaf = path.rpartition(".")
        if written is not None:
            raw = written.get(head, {}) if head else written
            if not isinstance(raw, Mapping) or leaf not in raw:
                continue
        value = getattr(getattr(section, head) if head else section, leaf)
        if value is not None:
            out[name] = value
    return out


def section_key(field_name: str) -> str:
    """``"large_ep.<key path>"`` of a ``LargeEPConfig`` field the section sets (``LAYER_FIELDS``)."""
    return f"{SECTION}." + next(path for path, name in LAYER_FIELDS if name == field_name)


def resolve_ep_size(section: LargeEPSection, world_size: int, num_experts: int | None = None) -> int:
    """The section's EP size for a world of ``world_size`` ranks whose MoE layers hold ``num_experts`` experts
    (None: not known yet, the experts follow the EP size, as in ``examples/train_deepspeed.py``).

    An integer must divide the world. ``"auto"`` is ``world_size / data_parallel_copies`` when the copies are
    given, else the number of experts (one expert per rank, the rest of the world data-parallel), else the whole
    world. Whatever the source, ``data_parallel_copies`` must then equal ``world_size / ep_size``.
    """
    ep, copies = section.ep_size, section.data_parallel_copies
    where = f"{SECTION}.ep_size={ep!r}"
    if ep is None:
        raise ValueError(f"{where}: give the expert-parallel size (an integer or \"{AUTO}\")")
    if ep == AUTO:
        if copies is not None:
            if world_size % copies:
                raise ValueError(f"{SECTION}.data_parallel_copies={copies} must divide the world size {world_size} "
                                 f"({where} is the world size / the copies)")
            ep = world_size // copies
        elif num_experts is not None:
            if world_size % num_experts:
                raise ValueError(f"{where}: the world size {world_size} is not a multiple of the {num_experts} "
                                 "experts per layer (one expert per rank); give ep_size or data_parallel_copies")
            ep = num_experts
        else:
            ep = world_size
    if world_size % ep:
        raise ValueError(f"{where} must divide the world size {world_size}")
    if copies is not None and copies * ep != world_size:
        raise ValueError(f"{SECTION}.data_parallel_copies={copies} with {SECTION}.ep_size={ep} needs a world of "
                         f"{copies * ep} ranks, not {world_size}")
    return ep


def load_ds_config(config: Any) -> dict[str, Any]:
    """A DeepSpeed config as a dict: a mapping is copied, a str/PathLike is read as JSON."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        loaded = read_json(config)
        if not isinstance(loaded, dict):
            raise ValueError(f"DeepSpeed config {os.fspath(config)!r} must hold a JSON object")
        return loaded
    raise ValueError(f"a DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _read_mapping(where: str, value: Any, cls: type) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}={value!r} has the wrong type: expected a JSON object, got {type(value).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {valid}")
    out = dict(value)
    for key, v in value.items():
        path = key if where == SECTION else f"{where[len(SECTION) + 1:]}.{key}"
        if key in _SUBSECTIONS and where == SECTION:
            continue
        _check_type(f"{SECTION}.{path}", v, _TYPES[path], nullable=_default_is_none(cls, key),
                    words=_WORDS.get(path, ()))
    return out


def _default_is_none(cls: type, key: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    return f.default is None


def _check_type(path: str, value: Any, types: tuple[type, ...], *, nullable: bool, words: tuple[str, ...] = ()) -> None:
    if value is None and nullable or isinstance(value, str) and value in words:
        return
    # JSON true is a bool, and a bool is an int in Python: never accept it where a number is expected.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = " or ".join([t.__name__ for t in types] + [f'"{w}"' for w in words] + ["null"] * nullable)
        raise ValueError(f"{path}={value!r} has the wrong type: expected {expected}, got {type(value).__name__}")


def _check_values(s: LargeEPSection) -> None:
    if s.enabled and s.ep_size is None:
        raise ValueError(f"{SECTION}.enabled is true but {SECTION}.ep_size is not set: give the expert-parallel size")
    if isinstance(s.ep_size, int) and s.ep_size < 1:
        raise ValueError(f"{SECTION}.ep_size={s.ep_size} must be >= 1, or \"{AUTO}\"")
    if s.data_parallel_copies is not None and s.data_parallel_copies < 1:
        raise ValueError(f"{SECTION}.data_parallel_copies={s.data_parallel_copies} must be >= 1, or null")
    if s.top_k is not None and s.top_k < 1:
        raise ValueError(f"{SECTION}.top_k={s.top_k} must be >= 1")
    if s.score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"{SECTION}.score_function={s.score_function!r} is not one of {list(SCORE_FUNCTIONS)}")
    if s.capacity_factor is not None and not (math.isfinite(s.capacity_factor) and s.capacity_factor > 0):
        raise ValueError(f"{SECTION}.capacity_factor={s.capacity_factor!r} must be a positive number, or null")
    if s.overlap.chunks < 1:
        raise ValueError(f"{SECTION}.overlap.chunks={s.overlap.chunks} must be >= 1")
    if s.overlap.ranks_per_node is not None and s.overlap.ranks_per_node < 1:
        raise ValueError(f"{SECTION}.overlap.ranks_per_node={s.overlap.ranks_per_node} must be >= 1, or null")
    if s.overlap.dispatch not in DISPATCH_KINDS:
        raise ValueError(f"{SECTION}.overlap.dispatch={s.overlap.dispatch!r} is not one of {list(DISPATCH_KINDS)}")
    if s.dynamic_replicas < 0:
        raise ValueError(f"{SECTION}.dynamic_replicas={s.dynamic_replicas} must be >= 0 (spare expert slots per "
                         "rank; 0 = off)")
    if s.rebalance_every < 1:
        raise ValueError(f"{SECTION}.rebalance_every={s.rebalance_every} must be >= 1")
    if not (math.isfinite(s.rebalance_decay) and 0 <= s.rebalance_decay < 1):
        raise ValueError(f"{SECTION}.rebalance_decay={s.rebalance_decay!r} must be a number in [0, 1)")
    if not (math.isfinite(s.rebalance_margin) and s.rebalance_margin >= 0):
        raise ValueError(f"{SECTION}.rebalance_margin={s.rebalance_margin!r} must be a finite number >= 0")
    if s.replace_every < 0:
        raise ValueError(f"{SECTION}.replace_every={s.replace_every} must be >= 0 (optimizer steps between decisions "
                         "to move home experts; 0 = off)")
    if not (math.isfinite(s.replace_margin) and s.replace_margin >= 0):
        raise ValueError(f"{SECTION}.replace_margin={s.replace_margin!r} must be a finite number >= 0")
    for name in ("bias_update_rate", "aux_loss_coeff", "z_loss_coeff"):
        v = getattr(s.load_balance, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{SECTION}.load_balance.{name}={v!r} must be a finite number >= 0")
