"""Megatron-LM's ``pretrain_gpt.py`` with large-EP MoE layers: a thin entry over Megatron-LM's own pieces.

How to run (from a Megatron-LM checkout at core_r0.16, with this package installed):
    # needs: a Megatron-LM checkout (core_r0.16) and GPUs
    cd /path/to/Megatron-LM
    torchrun --nproc-per-node 8 /path/to/largeep_plugin/examples/megatron_lm/pretrain_gpt_largeep.py \\
        <the usual pretrain_gpt.py arguments> --num-experts 8 --expert-model-parallel-size 8 \\
        --moe-token-dispatcher-type alltoall --large-ep [--large-ep-config large_ep.yaml] \\
        [--deepspeed_config ds.json] [--large-ep-monitor load.jsonl]

Without ``--large-ep`` (and without ``"enabled": true`` in the DeepSpeed JSON's ``large_ep`` section) this is
Megatron-LM's ``pretrain_gpt.py`` unchanged. A ``placement`` in the ``large_ep`` section (a topology YAML of one
EP group, optionally a load file) places the experts topology-aware. See README.md next to this file.
"""
import os
import sys
from functools import partial

# Megatron-LM's top-level modules (pretrain_gpt, model_provider, gpt_builders) live in its repository root.
sys.path.insert(0, os.environ.get("MEGATRON_LM_ROOT", os.getcwd()))

from gpt_builders import gpt_builder  # noqa: E402  (Megatron-LM)
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import pretrain  # noqa: E402  (Megatron-LM)
from model_provider import model_provider  # noqa: E402  (Megatron-LM)
from pretrain_gpt import forward_step, train_valid_test_datasets_provider  # noqa: E402  (Megatron-LM)

from largeep_plugin.integrations.megatron.lm import add_large_ep_args, large_ep_gpt_builder  # noqa: E402

if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        train_valid_test_datasets_provider,
        partial(model_provider, large_ep_gpt_builder(gpt_builder)),
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=add_large_ep_args,
    )
