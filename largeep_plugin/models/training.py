"""The demo's training loop, one call per rank: the tiny MoE transformer on Markov-chain tokens.

    results = run_world(train_rank, world_size, args=(TrainSettings(...),), threads_per_rank=1)

Each rank holds one expert per MoE layer (``LargeEPMoE`` over the world group), replicas of everything else.
A step is: forward, cross-entropy, backward, average the non-expert gradients over the world
(``allreduce_gradients``), the optimizer step, then the balancing-bias update of every MoE layer.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.tools.load_record import RoutingRecorder, record_largeep_routing
from largeep_plugin.layer.moe_layer import moe_layers, update_expert_biases
from largeep_plugin.tools.progress import ProgressBar
from .synthetic import MarkovChainData
from .tiny_moe import TinyMoEConfig, TinyMoETransformer, large_ep_config, largeep_moe_factory


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """One demo training run.

    Args:
        model: the transformer's shape (``num_experts`` must equal the world size: one expert per rank).
        steps: optimizer steps.
        batch_size: sequences per rank per step (each ``model.seq_len`` tokens).
        lr: AdamW learning rate.
        bias_update_rate: step of the balancing bias, applied after every optimizer step.
        branching: successors per token in the Markov chain (see ``MarkovChainData``).
        seed: data seed (the model has its own).
        warmup_steps: first steps left out of the tokens/s figure (first-touch allocations, lazy init).
        record_load: directory for the routing-load files (see ``load_record.py``), or None.
        progress: draw a progress bar on rank 0.
    """

    model: TinyMoEConfig
    steps: int = 50
    batch_size: int = 8
    lr: float = 3e-3
    bias_update_rate: float = 1e-3
    branching: int = 4
    seed: int = 0
    warmup_steps: int = 2
    record_load: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "branching"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if self.branching > self.model.vocab_size:
            raise ValueError(f"branching={self.branching} must be <= model.vocab_size={self.model.vocab_size}")
        # The config every rank builds: a bad value is one error here, not one traceback per rank.
        large_ep_config(self.model, bias_update_rate=self.bias_update_rate)


def warm_up_before_fork(model: TinyMoEConfig) -> None:
    """Run one tiny single-process step so that torch's lazy imports and first-call set-up (the optimizer pulls
    in a large part of torch on first use) happen once in the parent instead of once in each forked rank: with 16
    ranks on 2 cores that saves tens of seconds."""
    cfg = dataclasses.replace(model, num_experts=1, top_k=1, num_layers=1)
    net = TinyMoETransformer(cfg, largeep_moe_factory(large_ep_config(cfg)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    tokens_BS = torch.zeros(1, 2, dtype=torch.int64)
    net.loss(tokens_BS, tokens_BS).backward()
    optimizer.step()


def train_rank(rank: int, world_size: int, settings: TrainSettings) -> dict:
    """Train on this rank; returns the run's summary on rank 0 (losses, tokens/s, loads) and None elsewhere."""
    cfg = settings.model
    if cfg.num_experts != world_size:
        raise ValueError(
            f"num_experts={cfg.num_experts} must equal the world size {world_size}: the demo holds one expert per rank"
        )
    moe_cfg = large_ep_config(cfg, bias_update_rate=settings.bias_update_rate)
    model = TinyMoETransformer(cfg, largeep_moe_factory(moe_cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    data = MarkovChainData(cfg.vocab_size, branching=settings.branching, seed=settings.seed)
    layers = [layer for _, layer in moe_layers(model)]
    recorder = None
    if settings.record_load is not None:
        recorder = RoutingRecorder(cfg.num_experts, len(layers))
        record_largeep_routing(model, recorder)

    tokens_per_step = world_size * settings.batch_size * cfg.seq_len
    bar = ProgressBar(settings.steps, label="train") if settings.progress and rank == 0 else None
    losses: list[float] = []
    load_LE = torch.zeros(len(layers), cfg.num_experts, dtype=torch.int64)
    first_imbalance: list[float] = []
    timed_seconds, timed_steps = 0.0, 0
    for step in range(settings.steps):
        tokens_BS, targets_BS = data.batch(settings.batch_size, cfg.seq_len, rank=rank, step=step)
        start = time.perf_counter()
        loss = model.loss(tokens_BS, targets_BS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_gradients(model)
        optimizer.step()
        update_expert_biases(model)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # also lines the ranks up, so rank 0's clock measures the whole world's step
        elapsed = time.perf_counter() - start
        losses.append(float(mean_loss) / world_size)
        if step >= settings.warmup_steps:
            timed_seconds += elapsed
            timed_steps += 1
        for i, layer in enumerate(layers):
            load_LE[i] += layer.last_stats.tokens_per_expert_E
        if step == 0:
            first_imbalance = [layer.last_stats.imbalance for layer in layers]
        if bar is not None:
            tok_s = tokens_per_step * timed_steps / timed_seconds if timed_steps else tokens_per_step / elapsed
            bar.update(step + 1, loss=losses[-1], tok_s=tok_s)
    if bar is not None:
        bar.close()

    written: list[str] = []
    if recorder is not None:
        recorder.all_reduce()
        if rank == 0:
            written = recorder.write(settings.record_load)
    if rank != 0:
        return None
    return {
        "losses": losses,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step * timed_steps / timed_seconds if timed_steps else None,
        "timed_steps": timed_steps,
        "load_per_layer": load_LE.tolist(),
        "first_step_imbalance": first_imbalance,
        "last_step_imbalance": [layer.last_stats.imbalance for layer in layers],
        "entropy_floor": data.entropy_floor(),
        "uniform_loss": MarkovChainData.uniform_loss(cfg.vocab_size),
        "record_load_files": written,
    }
