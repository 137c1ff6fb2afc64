"""The training state a DeepSpeed engine keeps for each parameter, read and written whole: the ``StateAccess`` of
``layer/expert_state.py`` for moves and the training-state checkpoint of ``layer/training_state.py``.

    access = DeepSpeedState(engine)
    lep.move_experts(layer, home, access)                        # live re-placement by hand (collective)
    save_training_state(path, engine, extra={"step": step})      # by logical expert: any EP size resumes it
    extra = load_training_state(path, engine)                    # an engine built at another EP size

Where the state lives depends on the ZeRO stage (DeepSpeed 0.19.8):

* **Stage 0** (fp32): the engine steps a torch optimizer on the module's own parameters; the state is
  ``optimizer.state[param]`` (``expert_state.TorchOptimizerState``).
* **Stages 1 and 2**: each parameter group is one flat fp32 master partitioned over the group's data-parallel
  ranks (an MoE group over its expert-data-parallel group, ``stage_1_and_2.py:880``); Adam's moments are flat
  tensors of the same partition. ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
  put one parameter's value together with an all_reduce over ``param._dp_group`` (the group's data-parallel
  group, ``tensor_fragment.py:87``): collective over the ranks holding the parameter, which ``StateAccess``
  allows. ``safe_set_full_*`` write this rank's fragment only (no communication); the module's parameter (the
  engine's low-precision or fp32 working copy, a view of its flat buffer) is written here too, since ZeRO copies
  the master into it only after its next step. The fragments of the moments are linked to the optimizer's state
  here, group by group (``DeepSpeedState._link``: DeepSpeed links them once, too early for every group after the
  first); a load into an engine that has not stepped creates the state first.
* **Stage 3**: the fp32 master and moments of sub-group i are ``fp32_partitioned_groups_flat[i]`` and its
  optimizer state; ``get_full_hp_param`` all-gathers a parameter over its partition group (the
  expert-data-parallel group for the experts, ``hf_blocks.tag_for_zero3``), ``set_full_hp_param`` writes this
  rank's slice. The parameter's own partition (``ds_tensor``) is written from the master, and its whole value
  where ZeRO keeps it whole (a persistent small parameter).

Adam's ``step`` lives per flat group (the experts of a layer share one: they step together), read and written
as one number of every parameter of the group; a move writes the same value back. Gradients: DeepSpeed keeps them
in its reduce buckets between backward and ``engine.step`` (stages 1-3), which have no per-parameter write.
Moves happen after the step (the engine's hook, or by hand between steps), when no gradient is held: ``read``
gives ``"grad": None`` then, and a move between backward and the step is a NotImplementedError.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param,
                             safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state)

from largeep_plugin.layer import training_state
from largeep_plugin.layer.expert_state import State, TorchOptimizerState

__all__ = ["DeepSpeedState", "save_training_state", "load_training_state"]


class DeepSpeedState:
    """``StateAccess`` of a DeepSpeed engine's optimizer (module docstring): ZeRO 0 with a torch optimizer on fp32
    parameters, ZeRO 1, 2 and 3. ``read`` and ``write`` of a partitioned parameter (stages 1-3) are collective
    over the ranks holding it (every rank of its group calls them in the same order)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        opt = engine.optimizer
        self._torch: TorchOptimizerState | None = None
        self._group: dict[int, int] = {}
        if self.stage == 0:
            if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "bf16_groups") or hasattr(opt, "fp16_groups"):
                raise NotImplementedError(f"zero_optimization.stage=0 with {type(opt).__name__}: the training state "
                                          "is read from a torch optimizer on fp32 parameters at stage 0 (fp16 and "
                                          "bf16 keep masters in DeepSpeed's own wrapper); use ZeRO stage 1 or 2")
            self._torch = TorchOptimizerState(opt)
            return
        if self.stage in (1, 2):
            lp_groups = opt.bit16_groups
            self._flat = opt.single_partition_of_fp32_groups
        elif self.stage == 3:
            lp_groups = opt.fp16_groups
            self._flat = opt.fp32_partitioned_groups_flat
            if getattr(opt, "offload_optimizer", False) or getattr(opt, "swap_optimizer", False):
                raise NotImplementedError("zero_optimization.offload_optimizer with stage 3: the optimizer state "
                                          "is swapped out; moves and training-state checkpoints read it in memory")
        else:
            raise NotImplementedError(f"zero_optimization.stage={self.stage}")
        self._zero = opt
        self._lp_groups = lp_groups
        self._group = {id(p): i for i, group in enumerate(lp_groups) for p in group}
        self._linked: dict[int, tuple[str, ...]] = {}   # flat group -> the state keys its fragments are linked to

    # ---- what training_state.py asks of an optimizer ----------------------------------------------------------
    @property
    def optimizer(self) -> Any:
        """The torch optimizer whose parameter groups hold the hyper-parameters (saved and restored with the
        state: a scheduler's learning rate)."""
        return self._torch.optimizer if self._torch is not None else self._zero.optimizer

    def group_index(self, param: nn.Parameter) -> int | None:
        """The parameter group of ``param``: the torch optimizer's (stage 0) or the flat group it is in (stages 1
        and 2, one per group of the torch optimizer); None under stage 3 (its sub-groups are cut by size)."""
        if self._torch is not None:
            groups = self._torch.optimizer.param_groups
            return next((g for g, group in enumerate(groups) if any(q is param for q in group["params"])), None)
        return self._group.get(id(param)) if self.stage < 3 else None

    # ---- StateAccess ------------------------------------------------------------------------------------------
    def read(self, param: nn.Parameter, *, grad: bool) -> State:
        if self._torch is not None:
            return self._torch.read(param, grad=grad)
        i = self._index(param)
        state: State = {"param": safe_get_full_fp32_param(param)}
        if grad:
            self._check_no_gradient(param, i)
            state["grad"] = None
        own = self._zero.optimizer.state.get(self._flat[i], {})
        self._link(i, own)
        for key in sorted(own):
            value = own[key]
            if torch.is_tensor(value) and value.shape == self._flat[i].shape:
                state[f"optim.{key}"] = safe_get_full_optimizer_state(param, key)
            else:   # one entry of the whole flat group (Adam's step)
                state[f"optim.{key}"] = value.detach().clone() if torch.is_tensor(value) else value
        return state

    @torch.no_grad()
    def write(self, param: nn.Parameter, state: Mapping[str, Any]) -> None:
        if self._torch is not None:
            self._torch.write(param, state)
            return
        i = self._index(param)
        if state.get("grad") is not None:
            self._check_no_gradient(param, i, writing=True)
        flat = self._flat[i]
        optim = {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")}
        whole = {k: v for k, v in optim.items() if torch.is_tensor(v) and v.shape == _shape(param)}
        own = self._zero.optimizer.state[flat]
        missing = [k for k in whole if k not in own]
        for key in missing:   # an engine that has not stepped yet: the optimizer's state as its first step makes it
            own[key] = torch.zeros_like(flat)
        for key, value in optim.items():
            if key not in whole:
                like = own.get(key)
                own[key] = value.to(like.device, like.dtype).clone() if torch.is_tensor(like) and torch.is_tensor(
                    value) else (value.clone() if torch.is_tensor(value) else value)
        self._link(i, own)
        value = state["param"]
        safe_set_full_fp32_param(param, value.to(flat.device, flat.dtype))
        for key, v in whole.items():
            safe_set_full_optimizer_state(param, v.to(flat.device, flat.dtype), key)
        self._refresh_working_copy(param, i, value)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _index(self, param: nn.Parameter) -> int:
        if self.stage == 3:
            return int(self._zero.grad_position[self._zero.get_param_id(param)][0])
        i = self._group.get(id(param))
        if i is None:
            raise ValueError(f"parameter {tuple(param.shape)} is not one the engine's optimizer steps")
        return i

    def _link(self, i: int, own: Mapping[str, Any]) -> None:
        """Stages 1-2: point the fragments of group ``i``'s parameters at its optimizer state. DeepSpeed 0.19.8 links
        every group once, right after the first group's first step (``stage_1_and_2.py:2987``, in
        ``_optimizer_step``, which ``step`` calls per group): the groups after the first (the MoE groups) are
        linked to a state that does not exist yet, and ``safe_get_full_optimizer_state`` raises for their
        parameters. A load into an engine that has not stepped creates the state first (``write``)."""
        keys = tuple(sorted(own))
        if self.stage >= 3 or self._linked.get(i) == keys:
            return
        lazy_init_hp_params_optimizer_state(self._lp_groups[i], self._flat[i], self._zero.optimizer.state)
        self._linked[i] = keys

    def _check_no_gradient(self, param: nn.Parameter, i: int, writing: bool = False) -> None:
        # ZeRO fills averaged_gradients[i] from backward's buckets and empties it in step (every stage).
        held = param.grad is not None or self._zero.averaged_gradients.get(i) is not None
        if held or writing:
            raise NotImplementedError(
                f"zero_optimization.stage={self.stage}: moving experts between backward and engine.step is not "
                "supported (their gradients sit in ZeRO's reduce buckets, which have no per-parameter write); move "
                "after engine.step (the engine's hook does)")

    def _refresh_working_copy(self, param: nn.Parameter, i: int, value: torch.Tensor) -> None:
        """The module's parameter from the new master: its whole value under stages 1-2 (every rank holds it), its
        partition under stage 3, and its whole value where stage 3 keeps one."""
        if self.stage < 3:
            param.data.copy_(value.reshape(param.shape))
            return
        _, offset, numel = self._zero.grad_position[self._zero.get_param_id(param)]
        param.ds_tensor.data.copy_(self._flat[i].narrow(0, offset, numel).view_as(param.ds_tensor))
        if param.data.numel() == param.ds_numel:
            param.data.copy_(value.reshape(param.data.shape))


def _shape(param: nn.Parameter) -> torch.Size:
    """The parameter's full shape (ZeRO 3 keeps it in ``ds_shape`` while the tensor is released)."""
    return getattr(param, "ds_shape", param.shape)


def save_training_state(path: str, engine: Any, extra: Any = None) -> str:
    """``largeep_plugin.save_training_state`` of the engine's module and optimizer (``layer/training_state.py``):
    logical experts once each, at any ZeRO stage. Collective; after ``engine.step()``. Returns ``path``."""
    return training_state.save_training_state(path, engine.module, DeepSpeedState(engine), extra=extra)


def load_training_state(path: str, engine: Any) -> Any:
    """Read what ``save_training_state`` wrote (any route, any EP size) into ``engine`` (built by ``initialize``
    on a model of the same structure, at any EP size and ZeRO stage). Collective. Returns the saved ``extra``."""
    return training_state.load_training_state(path, engine.module, DeepSpeedState(engine))
