"""Train a small MoE transformer with DeepSpeed; the config file alone decides stock MoE or large-EP.

How to run (CPU, gloo; from the repository root):

    torchrun --nproc_per_node 4 examples/train_deepspeed.py --deepspeed_config ds_configs/large_ep_cpu.json
    torchrun --nproc_per_node 4 examples/train_deepspeed.py --deepspeed_config ds_configs/stock_moe_cpu.json
    deepspeed --num_gpus 16 examples/train_deepspeed.py --deepspeed_config ds_configs/large_ep_cpu.json # needs: 16 GPUs

The CPU config runs at any world size (``"ep_size": "auto"``: EP = world size, one expert per rank), e.g.
``--nproc_per_node 16`` for 16 experts per layer.

The model is written the stock DeepSpeed way (``deepspeed.moe.layer.MoE`` blocks, MoE parameter groups split
before initialisation). ``largeep_plugin.integrations.deepspeed.engine.initialize`` is a drop-in for ``deepspeed.initialize``:
with ``"large_ep": {"enabled": true, ...}`` in the config it converts the MoE blocks to large-EP layers (one expert
per rank) and updates their balancing bias after every ``engine.step()``; without it the model stays stock.
Experts per layer: the config's ``large_ep.ep_size`` when enabled (``"auto"``: the world size divided by
``large_ep.data_parallel_copies``, default 1), else ``--num-experts`` (default: world size).
"""
from __future__ import annotations

import argparse
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

import largeep_plugin as lep
from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm, initialize, large_ep_section
from largeep_plugin.integrations.section.config import resolve_ep_size
from largeep_plugin.integrations.deepspeed.stock import stock_moe_factory
from largeep_plugin.models.synthetic import MarkovChainData
from largeep_plugin.models.tiny_moe import TinyMoEConfig, TinyMoETransformer
from largeep_plugin.tools.docs_quick import shorten


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=None, help="stock runs only (default: world size)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", default=None, help="save a checkpoint through the engine at the end")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(p)
    return shorten(p.parse_args(), steps=2)  # LARGEEP_DOCS_QUICK=1: the docs check's short run


def main() -> None:
    args = parse_args()
    init_deepspeed_comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    section = large_ep_section(args)
    # The model is built here, so "auto" cannot follow its experts: the experts follow the EP size instead.
    experts = resolve_ep_size(section, world) if section.enabled else (args.num_experts or world)
    cfg = TinyMoEConfig(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                        num_layers=args.num_layers, seq_len=args.seq_len, num_experts=experts, top_k=args.top_k,
                        seed=args.seed)
    # Stock DeepSpeed MoE blocks with one expert per rank; the engine attaches their process groups.
    model = TinyMoETransformer(cfg, stock_moe_factory(cfg, ep_size=experts, attach_groups=False))
    params = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, _, _, _ = initialize(args=args, model=model, model_parameters=params)

    data = MarkovChainData(cfg.vocab_size, seed=args.seed)
    batch = engine.train_micro_batch_size_per_gpu()
    kind = f"large-EP (EP {experts})" if section.enabled else f"stock DeepSpeed MoE (EP {experts})"
    if rank == 0:
        print(f"{kind}: {world} ranks, {cfg.num_layers} layers x {experts} experts, {batch}x{cfg.seq_len} tokens/rank")
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        tokens, targets = data.batch(batch, cfg.seq_len, rank=rank, step=step)
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if rank == 0 and (step + 1) % 10 == 0:
            rate = (step + 1) * world * batch * cfg.seq_len / (time.perf_counter() - start)
            print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.3f}  {rate:,.0f} tokens/s", flush=True)
    if args.save_dir is not None:
        engine.save_checkpoint(args.save_dir)
    if rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    # Leave with the groups destroyed and no interpreter teardown: a rank whose gloo threads still hold a finished
    # collective can hang or abort at exit ("terminate called without an active exception", SIGABRT), which
    # torchrun reports as a failed job (largeep_plugin.end_process says why).
    lep.end_process()


if __name__ == "__main__":
    torch.set_num_threads(1)  # many ranks share the machine's cores on CPU
    main()
