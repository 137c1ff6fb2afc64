"""Peak memory per rank of loading a Hugging Face MoE checkpoint at EP R: transformers' loading followed by
``largeep_plugin.hf.convert_model``, against ``largeep_plugin.hf.from_pretrained``.

How to run (2 CPU cores, under a minute; writes a ~0.4 GB checkpoint to a temporary folder):
    python benchmarks/hf_load_memory.py                       # Mixtral shape, 16 experts, 4 layers, EP 4
    python benchmarks/hf_load_memory.py --ranks 2 --hidden 256

Each route runs in its own world of fresh gloo ranks. A rank resets its peak resident set (``VmHWM``, through
``/proc/self/clear_refs``) just before loading and reports the peak minus the resident set it had then: what the
loading itself added, the imports not counted. Linux only.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import torch


def _rss_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load(rank: int, world_size: int, path: str, route: str) -> float:
    from transformers import AutoModelForCausalLM

    from largeep_plugin.hf import convert_model, from_pretrained

    warnings.simplefilter("ignore")
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _rss_mb("VmRSS")
    if route == "transformers + convert_model":
        model = convert_model(AutoModelForCausalLM.from_pretrained(path), allow_colocate=True)
    else:
        model = from_pretrained(path, allow_colocate=True)
    peak = _rss_mb("VmHWM") - before
    del model
    return peak


def main() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from largeep_plugin.tools.launch import run_world

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                           num_experts_per_tok=2, num_hidden_layers=args.layers, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=1024)
    with tempfile.TemporaryDirectory() as path:
        model = MixtralForCausalLM(config)
        model.save_pretrained(path)
        total_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        expert_mb = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n) / 2**20
        del model
        print(f"checkpoint: {total_mb:.0f} MB fp32, of which experts {expert_mb:.0f} MB; EP {args.ranks}, "
              f"{args.experts // args.ranks} experts per rank")
        for route in ("transformers + convert_model", "largeep_plugin.hf.from_pretrained"):
            peaks = run_world(_load, args.ranks, args=(path, route), timeout=600.0)
            print(f"{route:36s} peak per rank (MB): " + ", ".join(f"{p:.0f}" for p in peaks))


if __name__ == "__main__":
    main()
