"""Load balancing and load logging for large-EP layers in a Megatron model.

Bias update (aux-loss-free balancing), after each optimizer step:
    * sigmoid routing with ``moe_router_enable_expert_bias=True``: Megatron's ``finalize_model_grads`` does it
      (it updates every module that has ``expert_bias`` and ``local_tokens_per_expert``; our router has both);
    * everything else (softmax routing; Megatron refuses the flag with softmax): the plugin's hook,
      ``update_large_ep_biases``, with the same reduction group (TP x DP x CP) and the same rule
      (``bias += rate * sign(mean - count)``, ``rate = LargeEPConfig.bias_update_rate``; 0 switches it off).
      ``install_bias_update_hook`` runs it after every optimizer step.

Dynamic replicas (``large_ep={"dynamic_replicas": S}``): after every optimizer step the clones get their homes'
new weights and, every ``rebalance_every`` steps, a new plan: ``largeep_plugin.rebalance(model)``, which
``install_bias_update_hook`` also runs after the bias update (collective over each EP group).

Live re-placement (``large_ep={"replace_every": N}``): every N steps the same ``rebalance`` may move home experts
between EP ranks with their optimizer state, read and written through ``MegatronOptimizerState`` (Megatron's
``FP32Optimizer`` parts; mixed precision and the distributed optimizer are refused), every data-parallel copy
alike (the window is summed over Megatron's expert-data-parallel group too). The hook needs the optimizer then.

Per-expert load (Megatron logs none): ``log_expert_load`` writes each layer's ``LoadStats`` to a ``LoadMonitor``
(JSON lines) and, when given one, to a TensorBoard ``SummaryWriter``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from largeep_plugin.layer.load_balance import LoadMonitor, apply_bias_updates
from largeep_plugin.layer.moe_layer import rebalance
from .layer import large_ep_moe_layers
from .optimizer_state import MegatronOptimizerState
from .router import LargeEPRouter


def _plugin_routers(model: Any) -> list[LargeEPRouter]:
    return [layer.router for _, layer in large_ep_moe_layers(model) if not layer.router.bias_managed_by_megatron]


@torch.no_grad()
def update_large_ep_biases(model: Any) -> int:
    """Apply the bias update of every large-EP router that Megatron does not update, then zero their counts.

    Collective over the routers' TP x DP x CP group (one all_reduce for all layers): call it on every rank of
    that group. Returns the number of routers updated."""
    routers = _plugin_routers(model)
    if not routers:
        return 0
    return apply_bias_updates([r.expert_bias for r in routers], [r.local_tokens_per_expert for r in routers],
                              [r.large_ep_config.bias_update_rate for r in routers], routers[0].count_group)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The last ``torch.optim.Optimizer`` inside a Megatron optimizer (or the optimizer itself): a
    ``ChainedOptimizer`` steps its parts in order (dense, then experts), so the last one's step ends the step."""
    seen = optimizer
    while not isinstance(seen, torch.optim.Optimizer):
        if getattr(seen, "chained_optimizers", None):
            seen = seen.chained_optimizers[-1]
        elif getattr(seen, "optimizer", None) is not None:
            seen = seen.optimizer
        else:
            raise ValueError(f"optimizer={optimizer!r} holds no torch.optim.Optimizer to hook")
    return seen


def install_bias_update_hook(
    model: Any, optimizer: Any = None, after: Callable[[], None] | None = None, *,
    monitor: LoadMonitor | None = None,
) -> Any:
    """Run ``update_large_ep_biases(model)`` and ``largeep_plugin.rebalance(model)`` (then ``after()``) after every
    optimizer step.

    Args:
        model: the model or its list of chunks.
        optimizer: a torch optimizer or a Megatron one (hooked on its last inner torch optimizer, so it runs once
            per step, after every part stepped; Megatron skips that step on overflow, and so is the update). None:
            the first torch optimizer of the process that steps (for Megatron-LM, whose training loop does not
            expose its optimizer); not with ``replace_every`` (the moves need the optimizer's state).
        after: called after the update (e.g. load logging).
        monitor: a ``LoadMonitor`` (on one rank) that logs every record ``rebalance`` returns: each decision to
            move experts (``"kind": "move"``: what moved where, bytes, the predicted busiest link before and after)
            and each re-plan of the clones, under the number of the step (1 after the first).
    Returns:
        the hook handle (``.remove()`` to uninstall).
    """

    movers = [layer for _, layer in large_ep_moe_layers(model) if layer.moves is not None]
    access, dp_group = None, None
    if movers:
        if optimizer is None:
            raise ValueError(f"replace_every={movers[0].large_ep_config.replace_every} moves experts with their "
                             "optimizer state: pass the optimizer, install_bias_update_hook(model, optimizer)")
        access = MegatronOptimizerState(optimizer)  # refuses what moves cannot read, before the first step
        dp_group = movers[0].expert_dp_group
    first: list[Any] = []
    steps = [0]

    def hook(opt: Any, *_: Any) -> None:
        # Megatron chains several torch optimizers (dense, experts): act once per step, on the first one.
        if not first:
            first.append(opt)
        if opt is not first[0]:
            return
        steps[0] += 1
        update_large_ep_biases(model)
        # Layers with replace_every: experts moved when due and worth it; with dynamic replicas: clones refreshed,
        # re-planned when due.
        records = rebalance(model, access, dp_group)
        if monitor is not None and records:
            monitor.log_replans(steps[0], records)
        if after is not None:
            after()

    if optimizer is None:
        return register_optimizer_step_post_hook(hook)
    return _torch_optimizer(optimizer).register_step_post_hook(hook)


def log_expert_load(
    model: Any, step: int, *, monitor: LoadMonitor | None = None, writer: Any = None
) -> list[dict[str, Any]]:
    """Log the latest ``LoadStats`` of every large-EP layer (global counts over its EP group).

    Call it on one rank per pipeline stage (the counts are already global). ``writer``: a TensorBoard
    ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``); per layer it gets
    ``large_ep/<layer>/imbalance``, ``.../drops`` and ``.../tokens_per_expert/<e>``.
    Returns the records (``LoadStats.as_dict()`` plus step and layer).
    """
    records = []
    for name, layer in large_ep_moe_layers(model):
        stats = layer.last_stats
        if stats is None:
            continue
        if monitor is not None:
            record = monitor.log(step, name, stats)
        else:
            record = {"step": int(step), "layer": name, **stats.as_dict()}
        records.append(record)
        if writer is not None:
            writer.add_scalar(f"large_ep/{name}/imbalance", record["imbalance"], step)
            writer.add_scalar(f"large_ep/{name}/drops", record["drops"], step)
            for e, count in enumerate(record["counts"]):
                writer.add_scalar(f"large_ep/{name}/tokens_per_expert/{e}", count, step)
    return records
