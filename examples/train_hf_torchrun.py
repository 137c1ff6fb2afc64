"""Train a Hugging Face MoE model converted to large-EP with plain PyTorch and torchrun (no DeepSpeed, no Megatron).

How to run (CPU, gloo; from the repository root):

    torchrun --nproc_per_node 4 examples/train_hf_torchrun.py --steps 20
    torchrun --nproc_per_node 4 examples/train_hf_torchrun.py --ep-size 2 --ddp --top-k 1 --family qwen2_moe --save runs/hf_tiny
    torchrun --nproc_per_node 4 examples/train_hf_torchrun.py --dynamic-replicas 1 --steps 20
    torchrun --nproc_per_node 8 examples/train_hf_torchrun.py --steps 200 --hidden-size 1024   # needs: 8 GPUs (NCCL)

A tiny random-init model of the chosen family is built from its transformers config on every rank (same seed, so
the same weights; nothing is downloaded), converted in place by ``largeep_plugin.hf.convert_model`` (each rank
keeps its experts only), and trained with AdamW on next-token prediction of a synthetic Markov chain. The world is
``--ep-size`` x data-parallel copies; each rank reads its own tokens. One step:

    loss = model(input_ids=tokens, labels=tokens).loss         # (ddp(...) with --ddp)
    loss.backward()
    without --ddp: lep.allreduce_gradients(model)              # dense averaged, experts summed over their holders
    with --ddp:    lep.allreduce_gradients(lhf.expert_parameters(model))   # DDP averaged the dense ones
    optimizer.step(); optimizer.zero_grad()
    lep.update_expert_biases(model, groups.dp_group)           # aux-loss-free balancing, one bias for all copies
    lep.rebalance(model)                                        # --dynamic-replicas: refresh (and re-plan) clones

Rank 0 prints the mean loss over the world and the load imbalance (max / mean tokens per expert, the worst layer)
every step, and with ``--dynamic-replicas`` the rank imbalance (max / mean rows the ranks computed). On GPUs (``torch.cuda.is_available()``, or ``--device cuda``) each rank takes the GPU ``LOCAL_RANK``
and the ranks talk over NCCL; otherwise the CPU and gloo.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import largeep_plugin as lep
import largeep_plugin.hf as lhf
from largeep_plugin.integrations.hf.tiny_models import BENCH_FAMILIES, ModelSizes, tiny_config
from largeep_plugin.models.synthetic import MarkovChainData
from largeep_plugin.tools.docs_quick import shorten

FAMILIES = tuple(BENCH_FAMILIES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="mixtral", help="the transformers model family to build")
    p.add_argument("--ep-size", type=int, default=None,
                   help="ranks per EP group; the world is EP size x data-parallel copies (default: the world)")
    p.add_argument("--num-experts", type=int, default=None,
                   help="routed experts per MoE layer (default: the EP size, one expert per rank)")
    p.add_argument("--allow-colocate", action="store_true",
                   help="allow more experts than EP ranks (several experts per rank)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--hidden-size", type=int, default=64, help="model width H")
    p.add_argument("--ffn-hidden-size", type=int, default=128, help="each expert's hidden width F")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (each with an MoE block)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab-size", type=int, default=128, help="tokens of the synthetic Markov chain")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0, metavar="NORM",
                   help="clip the gradients to this norm of the whole model (largeep_plugin.clip_grad_norm_: dense "
                        "parameters once, every expert once, the same on every rank); 0: no clipping")
    p.add_argument("--bias-update-rate", type=float, default=1e-3,
                   help="step of the aux-loss-free balancing bias after each optimizer step (0: off)")
    p.add_argument("--dynamic-replicas", type=int, default=0, metavar="S",
                   help="spare expert slots per rank for clones of hot experts, re-planned from the load after "
                        "every --rebalance-every steps (0: off; docs/balancing.md)")
    p.add_argument("--rebalance-every", type=int, default=1, metavar="N", help="re-plan the clones every N steps")
    p.add_argument("--ddp", action="store_true",
                   help="hold the dense parameters in torch DistributedDataParallel (experts ignored by it) "
                        "instead of all-reducing every gradient with allreduce_gradients")
    # Not "--monitor": torchrun would read it as an abbreviation of its own --monitor-interval.
    p.add_argument("--load-log", default=None, metavar="PATH",
                   help="append each step's per-expert load of every layer to this JSON-lines file (rank 0)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="at the end, write a checkpoint plain transformers loads (largeep_plugin.hf.save_pretrained)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU LOCAL_RANK with NCCL when CUDA is available, else the CPU with gloo")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and of the data")
    args = p.parse_args(argv)
    if args.dynamic_replicas < 0:
        p.error(f"--dynamic-replicas {args.dynamic_replicas} must be >= 0")
    for name in ("steps", "batch_size", "seq_len", "layers", "heads", "hidden_size", "ffn_hidden_size", "top_k",
                 "rebalance_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    try:
        sizes_of(args)
    except ValueError as e:
        p.error(str(e))
    return shorten(args, steps=2)  # LARGEEP_DOCS_QUICK=1: the docs check's short run


def sizes_of(args: argparse.Namespace) -> ModelSizes:
    """The model sizes of the command line (``ModelSizes`` checks them)."""
    return ModelSizes(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size, num_layers=args.layers,
                      num_heads=args.heads, vocab_size=args.vocab_size, seq_len=args.seq_len,
                      batch_size=args.batch_size, top_k=args.top_k)


def init_distributed(device: str) -> torch.device:
    """Join the torchrun world: NCCL and the GPU LOCAL_RANK on GPUs, gloo on the CPU."""
    if "RANK" not in os.environ:
        raise SystemExit("start the ranks with torchrun, e.g. torchrun --nproc_per_node 4 "
                         "examples/train_hf_torchrun.py")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def build_model(args: argparse.Namespace, groups: lhf.ParallelGroups, device: torch.device) -> torch.nn.Module:
    """The tiny model of ``--family`` (same weights on every rank), converted in place; this rank's experts only."""
    from transformers import AutoModelForCausalLM

    num_experts = args.num_experts if args.num_experts is not None else groups.ep_size
    if num_experts < args.top_k:
        raise ValueError(f"--num-experts {num_experts} must be >= --top-k {args.top_k}")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(tiny_config(args.family, num_experts, sizes_of(args))).float()
    lhf.convert_model(model, groups.ep_group, allow_colocate=args.allow_colocate,
                      bias_update_rate=args.bias_update_rate, dynamic_replicas=args.dynamic_replicas,
                      rebalance_every=args.rebalance_every)
    return model.to(device).train()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        groups = lhf.parallel_groups(args.ep_size)   # ValueError when the EP size does not divide the world
        model = build_model(args, groups, device)    # ValueError: e.g. more experts than ranks, not allowed
    except (ValueError, NotImplementedError) as e:
        dist.destroy_process_group()
        raise SystemExit(f"train_hf_torchrun.py: {e}") from None
    # (b) --ddp: DDP over the dense parameters, told to ignore the experts; (a): the model itself.
    runner = lhf.wrap_ddp(model) if args.ddp else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = MarkovChainData(args.vocab_size, seed=args.seed)
    monitor = lep.LoadMonitor(args.load_log) if args.load_log is not None and rank == 0 else None
    if rank == 0:
        blocks = [m for m in model.modules() if isinstance(m, lep.LargeEPMoE)]
        print(f"{args.family}: {world} ranks = EP {groups.ep_size} x {groups.copies} data-parallel copies, "
              f"{len(blocks)} MoE layers x {blocks[0].config.num_experts} experts (top-{blocks[0].config.top_k}), "
              f"{'DDP for the dense parameters' if args.ddp else 'allreduce_gradients'}, on {device.type}",
              flush=True)
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(args.steps):
        tokens, _ = data.batch(args.batch_size, args.seq_len, rank=rank, step=step)
        tokens = tokens.to(device)
        loss = runner(input_ids=tokens, labels=tokens).loss   # Hugging Face shifts the labels itself
        loss.backward()
        lep.allreduce_gradients(lhf.expert_parameters(model) if args.ddp else model)
        if args.max_grad_norm > 0:
            # Not torch.nn.utils.clip_grad_norm_: each rank holds other experts, so its own norm differs.
            lep.clip_grad_norm_(model, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lep.update_expert_biases(model, groups.dp_group)
        replans = lep.rebalance(model)  # clones get the new weights (and a new plan every --rebalance-every steps)
        stats = lep.load_stats(model)   # {layer: this step's load, counted over the EP group}
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if monitor is not None:
            for name, layer_stats in stats.items():
                monitor.log(step, name, layer_stats)
            monitor.log_replans(step, replans)
        if rank == 0:
            worst = max(s.imbalance for s in stats.values())
            ranks = max(s.rank_imbalance for s in stats.values())
            rate = (step + 1) * world * args.batch_size * args.seq_len / (time.perf_counter() - start)
            print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.4f}  imbalance {worst:.2f}  "
                  f"rank imbalance {ranks:.2f}  {rate:,.0f} tokens/s", flush=True)
    if monitor is not None:
        monitor.close()
    if args.save is not None:
        lhf.save_pretrained(model, args.save)   # collective: experts gathered, rank 0 writes
        if rank == 0:
            print(f"saved {args.save} (AutoModelForCausalLM.from_pretrained loads it)", flush=True)
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    # Leave with the groups destroyed and no interpreter teardown: gloo's threads may still hold a finished
    # collective, whose freeing needs the GIL while a process group's destructor joins them (a hang or a SIGABRT at
    # exit on busy cores; largeep_plugin.end_process says more).
    lep.end_process()


if __name__ == "__main__":
    torch.set_num_threads(1)  # many ranks share the machine's cores on CPU
    main()
