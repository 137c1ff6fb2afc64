"""Pretrain a small Megatron-Core GPT whose MoE layers are large-EP (experts = EP), on Megatron's mock data.

How to run:
    python examples/pretrain_gpt_largeep.py                   # 4 CPU ranks (gloo), EP 4, 4 layers, 20 steps
    python examples/pretrain_gpt_largeep.py --score-function sigmoid --monitor runs/megatron_load.jsonl
    python examples/pretrain_gpt_largeep.py --model deepseek-v3-tiny    # also mixtral-tiny, qwen3-tiny (see MODELS)
    torchrun --nproc-per-node 8 examples/pretrain_gpt_largeep.py --device cuda                # needs: 8 GPUs (NCCL)
    torchrun --nproc-per-node 8 examples/pretrain_gpt_largeep.py --device cuda --no-large-ep  # needs: 8 GPUs
    torchrun --nproc-per-node 1 examples/pretrain_gpt_largeep.py --device cuda --top-k 1      # needs: 1 GPU
    torchrun --nproc-per-node 4 examples/pretrain_gpt_largeep.py --device cuda --tp 2         # needs: 4 GPUs (TP 2)

Without ``torchrun`` the script starts ``--nproc`` local ranks itself. On GPUs it uses Megatron's DDP and
optimizer; on CPU they cannot run (their buffers live on CUDA), so it uses ``GlooDataParallel`` (Megatron's
gradient reduction on ``.grad``) and torch's AdamW. Both paths call Megatron's ``finalize_model_grads`` after the
backward (it moves the sigmoid routers' bias) and the plugin's hook after the optimizer step (softmax routers).
The stock MoE (``--no-large-ep``) cannot run on CPU: Megatron's router moves its weight to CUDA and its all-to-all
dispatcher creates a CUDA stream. Nor can ``--tp`` > 1: Megatron's MoE layer refuses to train with TP but without
sequence parallelism, and the sequence-parallel all-gather allocates on CUDA.

``--model`` picks a tiny version of a model family (``MODELS``): its routing, shared experts and balancing losses
as Megatron writes them; experts beyond the EP size are colocated (consecutive experts on a rank).

Prints the loss per step; ``--json-out`` writes losses, tokens/s and the per-expert load of the last step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from largeep_plugin.tools.docs_quick import shorten

STOCK_ON_CPU = (
    "--no-large-ep: the stock Megatron MoE layer cannot run on CPU (TopKRouter.gating moves its weight to "
    "torch.cuda.current_device(), and the alltoall token dispatcher creates a CUDA stream). Run the comparison on "
    "GPUs: torchrun --nproc-per-node N examples/pretrain_gpt_largeep.py --device cuda --no-large-ep"
)

# Megatron's import-time notes about optional packages, and the TransformerLayer's about our MLP class.
MEGATRON_NOISE = ".*(Transformer Engine|Apex|path_to_cache|Unknown MLP type).*"
TP_ON_CPU = (
    "--tp > 1 needs --device cuda: Megatron's MoELayer trains with tensor parallelism only under sequence "
    "parallelism, whose all-gather allocates its output on torch.cuda.current_device()"
)


# Tiny versions of the model families: TransformerConfig fields, with the number of experts per EP rank.
MODELS: dict[str, dict[str, Any]] = {
    # Mixtral: softmax top-2 of 8 (here one per rank), SwiGLU, the switch loss.
    "mixtral-tiny": dict(
        experts_per_rank=1, moe_router_topk=2, moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
    ),
    # Qwen3-MoE: softmax top-k renormalised, fine-grained experts, the global-batch loss.
    "qwen3-tiny": dict(
        experts_per_rank=2, moe_router_topk=2, moe_router_score_function="softmax",
        moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-3,
    ),
    # DeepSeek-V3: sigmoid scores with the aux-loss-free bias, 4 groups of which a token keeps 2, top-4, routed
    # scaling 2.5, a shared expert overlapped with the dispatch, the sequence-wise loss, the first layer dense.
    "deepseek-v3-tiny": dict(
        experts_per_rank=4, moe_router_topk=4, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size="ffn",
        moe_shared_expert_overlap=True, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4,
        moe_layer_freq="first-dense",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="local ranks to start when not under torchrun")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size = number of experts (default: world / tp)")
    p.add_argument("--large-ep", dest="large_ep", action=argparse.BooleanOptionalAction, default=True,
                   help="large-EP MoE layers (default) or Megatron's stock MoE (--no-large-ep, GPUs only)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128, help="expert ffn hidden size")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--score-function", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="a tiny model family (routing, shared experts, losses; overrides --top-k, --score-function)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--monitor", default=None, help="JSON-lines per-expert load file (LoadMonitor)")
    p.add_argument("--tensorboard-dir", default=None, help="per-expert load to TensorBoard (needs tensorboard)")
    p.add_argument("--json-out", default=None, help="write losses and tokens/s here")
    args = shorten(p.parse_args(argv), steps=2)  # LARGEEP_DOCS_QUICK=1: the docs check's short run
    if not args.large_ep and args.device == "cpu":
        p.exit(2, STOCK_ON_CPU + "\n")
    if args.tp > 1 and args.device == "cpu":
        p.exit(2, TP_ON_CPU + "\n")
    return args


def model_fields(args: argparse.Namespace, ep: int) -> tuple[dict[str, Any], int]:
    """The MoE fields of the TransformerConfig and the number of experts, from ``--model`` or the flags."""
    if args.model is None:
        sigmoid = args.score_function == "sigmoid"
        return dict(
            moe_router_topk=args.top_k, moe_router_score_function=args.score_function,
            moe_router_enable_expert_bias=sigmoid,
            moe_router_pre_softmax=args.top_k == 1 and not sigmoid,  # Megatron requires it for softmax top-1
        ), ep
    fields = dict(MODELS[args.model])
    experts = ep * fields.pop("experts_per_rank")
    if fields.get("moe_shared_expert_intermediate_size") == "ffn":
        fields["moe_shared_expert_intermediate_size"] = args.ffn
    if fields.get("moe_layer_freq") == "first-dense":
        fields["moe_layer_freq"] = [0] + [1] * (args.layers - 1)
    import torch.nn.functional as F

    fields.update(gated_linear_unit=True, activation_func=F.silu)  # SwiGLU experts, as all three families
    return fields, experts


def colocated_placement(experts: int, ep: int) -> Any:
    """Consecutive experts on each EP rank (None with one expert per rank)."""
    if experts == ep:
        return None
    from largeep_plugin.placement.plan import Placement
    from largeep_plugin.placement.topology import Topology

    per_rank = experts // ep
    held = tuple(tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep))
    return Placement(topology=Topology.uniform(1, ep), num_experts=experts, rank_to_experts=held)


def build_model(args: argparse.Namespace, ep: int) -> tuple[Any, Any]:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from largeep_plugin.integrations.megatron import TorchSDPAttention, get_gpt_decoder_block_spec_with_large_ep

    moe_fields, experts = model_fields(args, ep)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn, num_moe_experts=experts,
        moe_token_dispatcher_type="alltoall", tensor_model_parallel_size=args.tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1, sequence_parallel=args.tp > 1, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, init_method_std=0.02,
        **moe_fields,
    )
    torch.manual_seed(args.seed)  # the same non-expert weights on every rank
    if args.large_ep:
        core_attention = TorchSDPAttention if args.device == "cpu" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # colocated experts warn once per layer: said in the docstring
            spec = get_gpt_decoder_block_spec_with_large_ep(config, core_attention=core_attention,
                                                            placement=colocated_placement(experts, ep))
    else:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                         max_sequence_length=args.seq)
    return config, model


def mock_batches(args: argparse.Namespace, dp_rank: int, dp_size: int):
    """Megatron's MockGPTDataset (increasing token runs: learnable), each DP rank its own samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    cfg = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, tokenizer=NullTokenizer(vocab_size=args.vocab - 1), mid_level_dataset_surplus=0.005,
    )
    total = args.steps * args.micro_batch * dp_size
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [total, None, None], lambda: True, cfg).build()
    for step in range(args.steps):
        first = (step * dp_size + dp_rank) * args.micro_batch
        samples = [train[i] for i in range(first, first + args.micro_batch)]
        yield {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}


def train(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=MEGATRON_NOISE)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from largeep_plugin.integrations.megatron import GlooDataParallel, install_bias_update_hook, log_expert_load
    from largeep_plugin.layer.load_balance import LoadMonitor

    ep = args.ep or world // args.tp
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
        create_gloo_process_groups=False,
    )
    cuda = args.device == "cuda"
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        model_parallel_cuda_manual_seed(args.seed)
    config, model = build_model(args, ep)
    if cuda:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        model.cuda()
        wrapped = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0), [wrapped])
    else:
        wrapped = GlooDataParallel(config, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if args.large_ep:
        install_bias_update_hook(model, optimizer)

    dp_group = ps.get_data_parallel_group()
    logging_rank = rank == 0
    monitor = LoadMonitor(args.monitor) if args.monitor and logging_rank and args.large_ep else None
    writer = None
    if args.tensorboard_dir and logging_rank and args.large_ep:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(args.tensorboard_dir)
    device = torch.device("cuda" if cuda else "cpu")
    losses, load, step_times = [], [], []
    batches = mock_batches(args, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        if cuda:
            wrapped.zero_grad_buffer()
            optimizer.zero_grad()
        else:
            wrapped.zero_grad_buffer()
        per_token = wrapped(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss = (per_token.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        finalize_model_grads([wrapped])
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=dp_group)
        losses.append(float(mean_loss) / dist.get_world_size(dp_group))
        if args.large_ep:
            load = log_expert_load(model, step, monitor=monitor, writer=writer)
        if logging_rank:
            imb = f"  imbalance({load[0]['layer']}) {load[0]['imbalance']:.2f}" if load else ""
            print(f"step {step:3d}  loss {losses[-1]:.4f}{imb}", flush=True)
    if monitor is not None:
        monitor.close()
    if writer is not None:
        writer.close()
    timed = step_times[2:] or step_times
    tokens_per_step = args.micro_batch * args.seq * ps.get_data_parallel_world_size()
    ps.destroy_model_parallel()
    return {"losses": losses, "tokens_per_s": tokens_per_step * len(timed) / sum(timed), "load": load}


def _torchrun_main(args: argparse.Namespace) -> dict[str, Any]:
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    try:
        return train(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:
        result, world = _torchrun_main(args), int(os.environ["WORLD_SIZE"])
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        if args.device == "cuda":
            print("--device cuda: start the ranks with torchrun", file=sys.stderr)
            return 2
        from largeep_plugin.tools.launch import run_world

        # Imported once here, before the ranks fork: each rank would otherwise spend seconds importing Megatron.
        warnings.filterwarnings("ignore", message=MEGATRON_NOISE)
        import megatron.core.models.gpt  # noqa: F401
        import largeep_plugin.integrations.megatron  # noqa: F401

        world = args.nproc
        result = run_world(train, world, args=(args,), timeout=900)[0]
    first, last = result["losses"][0], result["losses"][-1]
    kind = "large-EP" if args.large_ep else "stock MoE"
    print(f"{kind}: world {world}, loss {first:.4f} -> {last:.4f}, {result['tokens_per_s']:.0f} tokens/s")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "world": world, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
