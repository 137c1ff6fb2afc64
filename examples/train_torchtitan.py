"""Train a tiny torchtitan MoE model (Qwen3-MoE or DeepSeek-V3 flavour of torchtitan's registry) with the large-EP
override, on CPU ranks, without torchtitan's trainer (which needs a GPU).

How to run (from the repository root):

    torchrun --nproc_per_node 4 examples/train_torchtitan.py --steps 5
    torchrun --nproc_per_node 4 examples/train_torchtitan.py --flavour deepseek_v3 --steps 5
    torchrun --nproc_per_node 8 -m torchtitan.train --module qwen3 --config qwen3_moe_debug --parallelism.expert_parallel_degree 8 --override.imports largeep_plugin.integrations.torchtitan.override.large_ep   # needs: GPU (8 of them: torchtitan's trainer)

The last line is torchtitan's own trainer with the one flag. The CPU run does what that trainer does, step by step,
with torchtitan's own pieces: the model config from its registry builders (integrations/torchtitan/tiny.py, causal
SDPA attention: FlexAttention has no backward on the CPU), the override applied by torchtitan's ``apply_overrides``
with the flag's target, the model built on the meta device, ``model.parallelize`` on torchtitan's meshes (EP = the
world size), torchtitan's FSDP wrapping (``apply_fsdp_to_decoder``: experts on the ``efsdp`` mesh), ``to_empty``,
``init_weights``, AdamW with torchtitan's own aux-loss-free bias hook (``register_moe_load_balancing_hook``), and
next-token cross-entropy on a synthetic Markov chain, summed and divided by the global token count as torchtitan's
trainer does (its FSDP does not divide). Rank 0 prints the loss and the load imbalance (max / mean tokens per
expert, the worst layer) every step.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import largeep_plugin as lep

TARGET = "largeep_plugin.integrations.torchtitan.override.large_ep"


def markov_tokens(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """[batch, seq + 1] tokens of a fixed random Markov chain (4 likely successors per token)."""
    table = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(batch, seq + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(seq):
        out[:, t + 1] = table[out[:, t], torch.randint(0, 4, (batch,), generator=gen)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="qwen3", choices=["qwen3", "deepseek_v3"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.config.override import OverrideConfig, apply_overrides
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    from largeep_plugin.integrations.torchtitan.cpu import cpu_parallel_dims
    from largeep_plugin.integrations.torchtitan.moe import LargeEPTitanMoE
    from largeep_plugin.integrations.torchtitan.tiny import set_ep_sharding, tiny_model_config

    dims = cpu_parallel_dims(ep=world)
    cfg = set_ep_sharding(tiny_model_config(args.flavour, sdpa=True))
    apply_overrides(OverrideConfig(imports=[TARGET]), cfg)           # what --override.imports does
    with torch.device("meta"):
        model = cfg.build()
    model.parallelize(dims)
    apply_fsdp_to_decoder(model, dims.get_mesh("fsdp"), param_dtype=torch.float32, reduce_dtype=torch.float32,
                          pp_enabled=False, ep_degree=world, edp_mesh=dims.get_optional_mesh("efsdp"))
    for module in model.modules():   # gloo has no PREMUL_SUM, which FSDP uses for torchtitan's divide factor 1:
        if isinstance(module, FSDPModule):   # a plain SUM is the same reduction
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)   # the same seed on every rank, as torchtitan's set_determinism
    model.init_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    register_moe_load_balancing_hook(optimizer, [model], dims)       # torchtitan's bias update, on our router
    moes = [m for m in model.modules() if isinstance(m, LargeEPTitanMoE)]
    if rank == 0:
        print(f"torchtitan {args.flavour}: {len(moes)} large-EP MoE layers, EP {world}, "
              f"{moes[0].layer.extra_repr()}")
    for step in range(args.steps):
        tokens = markov_tokens(4, args.seq, cfg.vocab_size, seed=1000 * step + rank)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(args.seq).repeat(inputs.shape[0], 1)
        logits = model(inputs, positions)
        global_tokens = labels.numel() * world
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / global_tokens
        loss.backward()
        counts = [m.tokens_per_expert_E.clone() for m in moes]       # the hook zeroes them in the step
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        imbalance = max(float(c.max() / c.mean()) for c in counts)
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {total.item():.4f}  imbalance (this rank) {imbalance:.2f}")
    lep.end_process()  # the groups destroyed, no interpreter teardown (largeep_plugin.end_process says why)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
