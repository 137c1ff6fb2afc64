r"""Train a tiny Hugging Face Mixtral with DeepSpeed; the config's "large_ep" section alone switches large-EP on.

How to run (CPU, gloo; from the repository root):

    torchrun --nproc_per_node 4 examples/train_hf_deepspeed.py \
        --deepspeed_config ds_configs/hf_large_ep_cpu.json --save-dir runs/train_hf_deepspeed/ckpt
    deepspeed --num_gpus 8 examples/train_hf_deepspeed.py \
        --deepspeed_config ds_configs/hf_large_ep_cpu.json   # needs: 8 GPUs

The model is a random-init ``MixtralForCausalLM`` built from a ``MixtralConfig`` (nothing downloaded) with
``--num-experts`` experts per layer (default: the world size, so that ``"ep_size": "auto"`` gives one expert per
rank). ``largeep_plugin.integrations.deepspeed.engine.initialize`` is a drop-in for ``deepspeed.initialize``: with
``"large_ep": {"enabled": true, ...}`` in the config it converts the Mixtral MoE blocks to large-EP blocks (each
rank keeps its own experts), and updates their balancing bias after every optimizer step; with ``"enabled":
false`` (or no section) the model stays the plain Hugging Face one, every rank holding every expert. The data is
a synthetic Markov chain, different on every rank, so the loss goes down. Rank 0 prints the loss (mean over the
ranks) and, for a converted model, the load imbalance (most tokens of one expert / the mean, the worst layer) of
every step; ``--save-dir`` writes a DeepSpeed checkpoint (``engine.save_checkpoint``: every expert in its own
file) at the end. On GPUs the deepspeed launcher or torchrun gives each rank its device and NCCL.
"""
from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.distributed as dist

import largeep_plugin as lep
from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm, initialize, large_ep_section
from largeep_plugin.integrations.hf.tiny_models import ModelSizes, tiny_config
from largeep_plugin.layer.moe_layer import load_stats
from largeep_plugin.models.synthetic import MarkovChainData
from largeep_plugin.tools.docs_quick import shorten


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    p.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer (default: world size)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--hidden-size", type=int, default=64, help="model width (default 64)")
    p.add_argument("--ffn-hidden-size", type=int, default=128, help="each expert's hidden width (default 128)")
    p.add_argument("--num-layers", type=int, default=2, help="decoder layers, each with an MoE block (default 2)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--vocab-size", type=int, default=64, help="vocabulary of the synthetic data (default 64)")
    p.add_argument("--seed", type=int, default=0, help="model weights and data (default 0)")
    p.add_argument("--save-dir", default=None, help="write a DeepSpeed checkpoint here at the end")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(p)
    return shorten(p.parse_args(), steps=2)  # LARGEEP_DOCS_QUICK=1: the docs check's short run


def build_model(args: argparse.Namespace, num_experts: int) -> torch.nn.Module:
    """A random-init Mixtral (``largeep_plugin.integrations.hf.tiny_models``); the same weights on every rank."""
    from transformers import MixtralForCausalLM

    sizes = ModelSizes(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                       num_layers=args.num_layers, vocab_size=args.vocab_size, seq_len=args.seq_len, top_k=args.top_k)
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(tiny_config("mixtral", num_experts, sizes)).float()


def main() -> None:
    args = parse_args()
    init_deepspeed_comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    section = large_ep_section(args)
    experts = args.num_experts or world
    model = build_model(args, experts)
    engine, _, _, _ = initialize(args=args, model=model, model_parameters=list(model.parameters()))

    data = MarkovChainData(args.vocab_size, seed=args.seed)
    batch = engine.train_micro_batch_size_per_gpu()
    if rank == 0:
        kind = f"large-EP (EP {engine.large_ep_section.ep_size})" if section.enabled else "unconverted"
        print(f"Mixtral, {kind}: {world} ranks, {args.num_layers} layers x {experts} experts (top {args.top_k}), "
              f"ZeRO {engine.zero_optimization_stage()}, {batch}x{args.seq_len} tokens per rank and micro-step",
              flush=True)
    first = last = 0.0
    for step in range(args.steps):
        total = torch.zeros((), device=engine.device)
        for micro in range(engine.gradient_accumulation_steps()):
            tokens, _ = data.batch(batch, args.seq_len, rank=rank, step=step * 1000 + micro)
            tokens = tokens.to(engine.device)
            loss = engine(input_ids=tokens, labels=tokens).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        last = float(total) / world / engine.gradient_accumulation_steps()
        first = first or last
        if rank == 0:
            stats = load_stats(engine.module)
            imbalance = f"  load imbalance {max(float(s.imbalance) for s in stats.values()):.2f}" if stats else ""
            print(f"step {step + 1}/{args.steps}  loss {last:.3f}{imbalance}", flush=True)
    if args.save_dir is not None:
        engine.save_checkpoint(args.save_dir)  # collective: each expert's holder writes its file
    if rank == 0:
        saved = f", checkpoint in {args.save_dir}" if args.save_dir else ""
        print(f"loss {first:.3f} -> {last:.3f}{saved}", flush=True)
    # Leave with the groups destroyed and no interpreter teardown (largeep_plugin.end_process says why).
    lep.end_process()


if __name__ == "__main__":
    torch.set_num_threads(1)  # many ranks share the machine's cores on CPU
    main()
