"""``largeep bench hf``: a Hugging Face MoE model trained side by side, unconverted, with DeepSpeed's AutoEP, with
large-EP, and with large-EP plus dynamic replicas of the hot experts, on CPU ranks.

    largeep bench hf --family mixtral --ep 4                  # uniform and learned routers, E = 4 experts
    largeep bench hf --family mixtral --ep 8,16               # the table of docs/performance.md
    largeep bench hf --family deepseek_v3 --ep 4,8 --router skewed --iters 9
    largeep bench hf --family gpt_oss --ep 4 --variants unconverted,large_ep,large_ep_replicas

The model: a tiny random-init model of the family (no download; --hidden-size, --ffn-hidden-size, --num-layers...),
E = EP experts, the same weights and tokens (--batch-size x --seq-len per rank) for every variant, all under one
DeepSpeed config (ZeRO stage 1, AdamW). One step = forward + backward + optimizer step.
    unconverted         plain deepspeed.initialize: every rank holds every expert (data parallel)
    autoep              DeepSpeed's AutoEP ("expert_parallel" section, autoep_size = EP); skipped, with the reason
                        in one line, where it cannot run (transformers > 5.22.2, or no AutoEP preset: olmoe, gpt_oss)
    large_ep            the plugin's conversion, expert e on rank e
    large_ep_dynamic    large-EP with dynamic replicas: one spare slot per rank, clones of the hot experts
                        re-planned after every step (docs/balancing.md)
    large_ep_replicas   large-EP with E + X expert slots (--replica-slots X, default one more per rank): the extra
                        copies go to the hot experts, planned by plan_placement from the load large_ep recorded
                        over its first steps (--record-steps); not in the default list
    force_balanced      large_ep's critical path with every rank's compute at the mean of the ranks (no run)
Routers: uniform (no expert favoured), learned (the model trained --learn-steps steps on the synthetic Markov
chain first, as a real router learns, skew and all; its tokens come from the chain, whose token frequencies fall off
as text's, Zipf exponent --zipf) and skewed (the last quarter of the experts favoured by --skew standard
deviations). Printed: the measured max / mean tokens per expert.

Timing, two ways (largeep_plugin/integrations/hf/bench.py; the variants are built in bench_variants.py). Wall clock:
the variants interleaved in one world per (EP, router), --warmup untimed steps, the median of --iters timed ones;
the ranks share this machine's cores, which hides imbalance. Critical path: --iters more steps of each variant with
the ranks taking turns between collectives (no two compute at once): the sum over the step's compute segments of the
slowest rank's time plus the collectives (gloo over loopback), what one device per rank would take. With no more
ranks than cores (EP 2 here) every rank is pinned to a core of its own, and the check line compares the critical
path with the wall clock of the ranks running at once, and the line under it how much the machine's cores slowed the
same expert GEMMs when both ran them at once (docs/performance.md). Printed: tokens/s per rank both ways, each over
autoep, the critical path and its communication, the all-to-all MB per step that would cross nodes with the ranks on
two nodes, the peak memory per rank, the expert imbalance and the measured max / mean rows per rank; written to
--out: hf_bench.json, hf_bench.png (critical-path tokens/s) and hf_bench_wall.png.

DeepSpeed's AutoEP runs with transformers <= 5.22.2 only. When this environment's transformers is newer and
scripts/setup.sh made the AutoEP environment (.venv-autoep: this one with transformers 5.22.2 over it), the command
runs itself there, so every variant, AutoEP included, runs on the same transformers; otherwise autoep is skipped
with the reason.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from largeep_plugin.tools.docs_quick import shorten
from .bench_layer import parse_list
from .flags import add_model_flags, int_at_least, int_list, number

ROUTER_CHOICES = ("uniform", "skewed", "learned")


def _families() -> str:
    try:
        from largeep_plugin.integrations.hf.tiny_models import BENCH_FAMILIES
    except ImportError:  # transformers (hf extra) missing: the command says so when run
        return "see largeep_plugin/integrations/hf/tiny_models.py"
    return ", ".join(BENCH_FAMILIES)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("hf", help="a Hugging Face MoE model: unconverted, AutoEP, large-EP, large-EP + replicas",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos, nonneg = int_at_least(1), int_at_least(0)
    p.add_argument("--family", default="mixtral", help=f"the model family: {_families()} (default mixtral)")
    p.add_argument("--ep", type=int_list(1), default="4",
                   help="EP sizes = ranks (= experts unless --num-experts), comma-separated (default 4)")
    p.add_argument("--router", default="uniform,learned",
                   help=f"routers to run, comma-separated, of {', '.join(ROUTER_CHOICES)} (default uniform,learned)")
    p.add_argument("--variants", default="unconverted,autoep,large_ep,large_ep_dynamic",
                   help="comma-separated subset of unconverted, autoep, large_ep, large_ep_dynamic, "
                        "large_ep_replicas (default: the first four)")
    p.add_argument("--learn-steps", type=pos, default=300,
                   help="training steps of the learned router, once, before the ranks start (default 300)")
    p.add_argument("--zipf", type=number(0.0), default=1.0,
                   help="learned router: the Zipf exponent of the token frequencies of the Markov chain it learns "
                        "on and is timed on; 1 is about text's, 0 makes every token about as frequent (default 1)")
    p.add_argument("--no-critical-path", action="store_true", help="wall clock only (no turn-taking steps)")
    p.add_argument("--num-experts", type=pos, default=None,
                   help="experts per block (default: the EP size, one per rank; more colocates them, e.g. --ep 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo ranks) or cuda (rank r on GPU r, NCCL) (default cpu)")
    add_model_flags(p, batch_size=8, seq_len=32, hidden_size=128, ffn_hidden_size=256, num_layers=2, num_heads=4,
                    top_k=2)
    p.add_argument("--vocab-size", type=pos, default=256, help="vocabulary (default 256)")
    p.add_argument("--skew", type=number(0.0), default=1.5,
                   help="skewed router: hot experts' logits raised by this many standard deviations (default 1.5)")
    p.add_argument("--replica-slots", type=pos, default=None,
                   help="extra expert slots of large_ep_replicas (default: one per rank)")
    p.add_argument("--record-steps", type=pos, default=2, help="first steps of every variant, before the timed ones; "
                   "the replicas are planned from large_ep's load over them (default 2)")
    p.add_argument("--warmup", type=nonneg, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--iters", type=pos, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--seed", type=nonneg, default=0, help="seed of the weights and the tokens (default 0)")
    p.add_argument("--lr", type=number(0.0, above=True), default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--timeout", type=number(0.0, above=True), default=1800.0,
                   help="seconds one world may take (default 1800)")
    p.add_argument("--out", default="runs/bench_hf", help="directory for the JSON and PNG (default runs/bench_hf)")
    return p


# scripts/setup.sh's environment for DeepSpeed's AutoEP (transformers 5.22.2 over this one), at the repository root.
AUTOEP_ENV = ".venv-autoep"
_IN_AUTOEP_ENV = "LARGEEP_AUTOEP_ENV"


def autoep_python() -> str | None:
    """The AutoEP environment's interpreter, when scripts/setup.sh made it (None otherwise, or inside it)."""
    import os

    if os.environ.get(_IN_AUTOEP_ENV):
        return None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, AUTOEP_ENV, "bin", "python")
    return path if os.access(path, os.X_OK) else None


def _run_in_autoep_env(python: str, argv: list[str]) -> int:
    """This command again, under ``python`` (every variant on AutoEP's transformers)."""
    import os
    import subprocess

    print(f"bench hf: this environment's transformers is too new for DeepSpeed's AutoEP; running in {AUTOEP_ENV} "
          "(transformers 5.22.2, the rest of this environment)", file=sys.stderr, flush=True)
    env = dict(os.environ, **{_IN_AUTOEP_ENV: "1"})
    return subprocess.run([python, "-m", "largeep_plugin.cli", *argv], env=env).returncode


def run(args: argparse.Namespace) -> int:
    try:
        shorten(args, iters=1, warmup=1, record_steps=1, seq_len=16, learn_steps=5)
        from largeep_plugin.integrations.hf.bench import format_table, result_json, run_hf_bench
        from largeep_plugin.integrations.hf.bench_variants import HFBenchSettings, autoep_unavailable, check_variants
        from largeep_plugin.integrations.hf.tiny_models import ModelSizes

        sizes = ModelSizes(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                           num_layers=args.num_layers, num_heads=args.num_heads, vocab_size=args.vocab_size,
                           seq_len=args.seq_len, batch_size=args.batch_size, top_k=args.top_k)
        settings = HFBenchSettings(family=args.family, sizes=sizes, skew=args.skew, replica_slots=args.replica_slots,
                                   record_steps=args.record_steps, warmup=args.warmup, iters=args.iters,
                                   seed=args.seed, lr=args.lr, learn_steps=args.learn_steps,
                                   zipf=args.zipf,
                                   critical_path=not args.no_critical_path, num_experts=args.num_experts,
                                   device=args.device)
        variants = parse_list("--variants", args.variants, str)
        routers = parse_list("--router", args.router, str)
        bad = [r for r in routers if r not in ROUTER_CHOICES]
        if bad:
            raise ValueError(f"--router {','.join(bad)}: choose from {', '.join(ROUTER_CHOICES)}")
        check_variants(variants)
        experts = {ep: settings.experts(ep) for ep in args.ep}
        bad_ep = [ep for ep, e in experts.items() if e < args.top_k or e < ep]
        if bad_ep:
            raise ValueError(f"--ep {bad_ep} with {[experts[ep] for ep in bad_ep]} experts: need EP <= experts "
                             f"and experts >= --top-k {args.top_k}")
        skipped = autoep_unavailable(args.family) if "autoep" in variants else None
        python = autoep_python()
        if skipped is not None and skipped.startswith("transformers ") and python is not None:
            return _run_in_autoep_env(python, getattr(args, "_argv", ["bench", "hf"]))
    except ImportError as e:
        print(f"largeep bench hf: needs transformers and deepspeed ({e}; pip install -e .[hf,deepspeed])",
              file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"largeep bench hf: {e}", file=sys.stderr)
        return 2
    print(f"bench hf: {args.family}, EP {args.ep}, routers {routers}; H={sizes.hidden_size}, expert F="
          f"{sizes.ffn_hidden_size}, {sizes.num_layers} layers, top-{sizes.top_k}, {sizes.tokens_per_rank} tokens/rank; "
          f"E = EP experts; ZeRO 1, AdamW", file=sys.stderr)
    if skipped is not None:
        print(f"  autoep skipped: {skipped}", file=sys.stderr)
        variants = [v for v in variants if v != "autoep"]

    def on_world(w: dict[str, Any]) -> None:
        if w["imbalance"] is not None:
            layers = ", ".join(f"{x:.2f}" for x in w["layer_imbalance"])
            print(f"  EP {w['ep']} {w['router']}: tokens per expert max/mean {w['imbalance']:.2f} (last step per "
                  f"layer: {layers})", file=sys.stderr)

    rows, worlds = run_hf_bench(settings, args.ep, routers, variants, timeout=args.timeout, on_world=on_world)
    print(format_table(rows))
    for line in target_lines(rows):
        print(line)
    paths = write_outputs(args.out, result_json(settings, rows, worlds, skipped), rows, args.family)
    for path in paths:
        print(f"written {path}")
    return 0


def _ratio(ratio: float, aim: float) -> str:
    """``ratio`` as ``1.23x``, with a third digit where two would round it onto the aim it misses or meets."""
    return f"{ratio:.3f}x" if f"{ratio:.2f}" == f"{aim:.2f}" and ratio != aim else f"{ratio:.2f}x"


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Whether this run met the targets of docs/performance.md, where it measured what they are about: at EP 16
    with the learned router (expert imbalance >= 2), large_ep_dynamic >= 1.4x autoep and >= 0.90x force_balanced in
    critical-path tokens/s; with the uniform router large_ep >= 1.0x autoep."""
    def get(ep: int, router: str, variant: str) -> dict[str, Any] | None:
        return next((r for r in rows if (r["ep"], r["router"], r["variant"]) == (ep, router, variant)), None)

    out = []
    for ep in sorted({r["ep"] for r in rows}):
        dyn, auto = get(ep, "learned", "large_ep_dynamic"), get(ep, "learned", "autoep")
        bal = get(ep, "learned", "force_balanced")
        if ep == 16 and dyn and dyn.get("critical_tokens_per_s") and (dyn["imbalance"] or 0) >= 2:
            if auto and auto.get("critical_tokens_per_s"):
                ratio = dyn["critical_tokens_per_s"] / auto["critical_tokens_per_s"]
                out.append(f"target EP 16 learned: large_ep_dynamic >= 1.4x autoep (critical path): {_ratio(ratio, 1.4)}, "
                           f"{'met' if ratio >= 1.4 else 'NOT met'}")
            if bal:
                ratio = dyn["critical_tokens_per_s"] / bal["critical_tokens_per_s"]
                out.append(f"target EP 16 learned: large_ep_dynamic >= 0.90x force_balanced: {_ratio(ratio, 0.9)}, "
                           f"{'met' if ratio >= 0.9 else 'NOT met'}")
        ours, auto = get(ep, "uniform", "large_ep"), get(ep, "uniform", "autoep")
        if ours and auto and ours.get("critical_tokens_per_s") and auto.get("critical_tokens_per_s"):
            ratio = ours["critical_tokens_per_s"] / auto["critical_tokens_per_s"]
            out.append(f"target EP {ep} uniform: large_ep >= 1.0x autoep (critical path): {_ratio(ratio, 1.0)}, "
                       f"{'met' if ratio >= 1.0 else 'NOT met'}")
        # The check: each step's own critical path (its slowest rank per segment, as the wall clock pays it)
        # against the wall clock of the same steps' neighbours with collectives waited at once.
        crit = lambda r: r.get("per_step_critical_tokens_per_s") or r.get("critical_tokens_per_s")  # noqa: E731
        checked = [r for r in rows if r["ep"] == ep and r["router"] == "uniform" and r.get("waited_tokens_per_s")
                   and crit(r)]
        if checked:
            worst = max(checked, key=lambda r: abs(crit(r) / r["waited_tokens_per_s"] - 1))
            gap = crit(worst) / worst["waited_tokens_per_s"] - 1
            parts = ""
            if worst.get("waited_compute_ms") is not None:
                parts = (f" (compute {worst['compute_ms']:.1f} ms, collectives {worst['comm_ms']:.1f} ms; the wall "
                         f"clock's own {worst['waited_compute_ms']:.1f} and {worst['waited_communication_ms']:.1f})")
            out.append(f"check EP {ep} uniform: the critical path agrees with the wall clock (collectives waited at "
                       f"once, a core per rank) within 10 %: worst {worst['variant']} {100 * gap:+.1f} %{parts}, "
                       f"{'met' if abs(gap) <= 0.10 else 'NOT met'}")
            if worst.get("core_slowdown") is not None:
                slower = 100 * (worst["core_slowdown"] - 1)
                out.append(f"  this machine in this run: an expert's GEMMs took {slower:+.1f} % on every rank at once "
                           "over the same rank alone (median of 5 rounds; 0 where the ranks share nothing, as on a "
                           "cluster)")
    return out


def write_outputs(directory: str, payload: dict[str, Any], rows: list[dict[str, Any]], family: str) -> list[str]:
    """hf_bench.json, hf_bench.png (critical-path tokens/s) and hf_bench_wall.png (wall clock) in ``directory``."""
    import os

    from largeep_plugin.tools.side_by_side import plot_throughput, write_json

    paths = [write_json(os.path.join(directory, "hf_bench.json"), payload)]
    group = lambda r: f"EP {r['ep']} {r['router']}"  # noqa: E731
    for stem, key, label in (("hf_bench", "critical_tokens_per_s", "critical path"),
                             ("hf_bench_wall", "tokens_per_s_per_rank", "wall clock")):
        shown = [r for r in rows if r.get(key)]
        if shown:
            path = os.path.join(directory, f"{stem}.png")
            plot_throughput(shown, path, f"{family} training step, CPU gloo ranks ({label})", group_of=group,
                            value=key)
            paths.append(path)
    return paths
