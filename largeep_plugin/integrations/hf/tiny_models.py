"""Tiny random-init Hugging Face MoE models, built from a config (no download), identical in every process: the
models and tokens of ``largeep bench hf`` (every variant) and of the examples (``examples/train_hf_*.py``), with a
router that is fresh (near-uniform) or skewed.

Shape legend:
    B  sequences per rank   S  tokens per sequence   V  vocabulary   H  hidden size   E  experts

    model = bench_model("mixtral", num_experts=8, sizes=ModelSizes(), router="skewed", seed=0)
    ids_BS = rank_tokens(sizes, rank=3, seed=0)

Families are keyed by their Hugging Face ``model_type`` (``BENCH_FAMILIES``); each maps the sizes onto its own config
fields (experts, expert FFN width, shared expert, DeepSeek's groups and latent attention, gpt-oss's head size).

Routers (``set_router``): the input of an MoE block has a mean direction m (attention mixes tokens), and a fresh
router's rows have random shares along it that favour some experts for every token. ``"uniform"`` removes them
(every router row orthogonal to m): tokens choose by what is their own. ``"skewed"`` first gives every token
embedding a shared direction (as long as a typical embedding row), then aligns the rows of the hot experts
(``hot_experts``: the last quarter, at least one) with m so that their logits rise by ``skew`` standard deviations
for every token, and they get more of the tokens. ``"learned"`` is neither forced: the uniform model trained
``learn_steps`` steps (AdamW, no balancing loss) on a synthetic Markov chain of the demo's kind, whose routing it
has learned as a real router does, skew included; its tokens come from the same chain (``rank_tokens``), whose token
frequencies follow Zipf's law with exponent ``zipf`` (1: about text's, so the router's skew comes from the data; 0:
every token about as frequent). A pure function of the seed: every variant and every rank builds the same weights
(the learned ones are trained once per process, in the parent before the ranks fork when the benchmark asks for them
first).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .families import family_of

ROUTERS = ("uniform", "skewed", "learned")
LEARN_STEPS = 300  # "learned": the training steps of the router (and the rest of the model)
LEARN_LR = 3e-3
LEARN_ZIPF = 1.0  # "learned": the Markov chain's token frequencies fall off as text's (MarkovChainData's zipf)


@dataclass(frozen=True, kw_only=True)
class ModelSizes:
    """The model's sizes and the tokens per rank.

    Fields:
        hidden_size: H.
        ffn_hidden_size: the routed experts' FFN width (and the shared expert's, where the family has one).
        num_layers: decoder layers, each with an MoE block.
        num_heads: attention heads (as many key/value heads).
        vocab_size: V.
        seq_len, batch_size: S and B, the tokens of one rank per step (B * S).
        top_k: experts per token.
    """

    hidden_size: int = 128
    ffn_hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 256
    seq_len: int = 32
    batch_size: int = 8
    top_k: int = 2

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "vocab_size", "seq_len",
                     "batch_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must be num_heads={self.num_heads} times an even head "
                             "size (rotary embeddings rotate pairs)")

    @property
    def tokens_per_rank(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _common(s: ModelSizes) -> dict[str, Any]:
    return dict(hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                num_key_value_heads=s.num_heads, vocab_size=s.vocab_size, num_experts_per_tok=s.top_k,
                max_position_embeddings=max(256, s.seq_len), bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _deepseek_groups(e: int) -> dict[str, int]:
    """Group-limited routing where the experts allow it: groups of two or more experts (DeepSeek scores a group by
    its two best experts), half of them kept."""
    groups = 4 if e >= 8 and e % 4 == 0 else 2 if e >= 4 and e % 2 == 0 else 1
    return dict(n_group=groups, topk_group=max(1, groups // 2))


# model_type -> (transformers config class, its fields for E experts and the sizes)
BENCH_FAMILIES: dict[str, tuple[str, Callable[[int, ModelSizes], dict[str, Any]]]] = {
    "mixtral": ("MixtralConfig", lambda e, s: dict(intermediate_size=s.ffn_hidden_size, num_local_experts=e)),
    "qwen3_moe": ("Qwen3MoeConfig", lambda e, s: dict(moe_intermediate_size=s.ffn_hidden_size, num_experts=e,
                                                      norm_topk_prob=True, head_dim=s.head_dim)),
    "qwen2_moe": ("Qwen2MoeConfig", lambda e, s: dict(moe_intermediate_size=s.ffn_hidden_size, num_experts=e,
                                                      shared_expert_intermediate_size=s.ffn_hidden_size)),
    "deepseek_v3": ("DeepseekV3Config", lambda e, s: dict(
        moe_intermediate_size=s.ffn_hidden_size, n_routed_experts=e, n_shared_experts=1, first_k_dense_replace=0,
        kv_lora_rank=s.hidden_size // 2, q_lora_rank=None, qk_rope_head_dim=s.head_dim // 2,
        qk_nope_head_dim=s.head_dim // 2, v_head_dim=s.head_dim, **_deepseek_groups(e))),
    "olmoe": ("OlmoeConfig", lambda e, s: dict(intermediate_size=s.ffn_hidden_size, num_experts=e)),
    "gpt_oss": ("GptOssConfig", lambda e, s: dict(intermediate_size=s.ffn_hidden_size, num_local_experts=e,
                                                  head_dim=s.head_dim)),
}


def check_family(family: str) -> None:
    """ValueError naming ``family`` when it is not a bench family."""
    if family not in BENCH_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {', '.join(BENCH_FAMILIES)}")


def tiny_config(family: str, num_experts: int, sizes: ModelSizes) -> Any:
    """The transformers config of the tiny ``family`` model with ``num_experts`` experts."""
    import transformers

    check_family(family)
    if sizes.top_k > num_experts:
        raise ValueError(f"top_k={sizes.top_k} > {num_experts} experts")
    class_name, fields = BENCH_FAMILIES[family]
    config = getattr(transformers, class_name)(**_common(sizes), **fields(num_experts, sizes))
    if config.model_type != family:
        raise AssertionError(f"{class_name} is model_type {config.model_type!r}, not {family!r}")
    return config


def hot_experts(num_experts: int) -> list[int]:
    """The experts the skewed router favours: the last quarter, at least one (not the lowest ids, which win the
    ties of a planner that knew nothing of the load)."""
    return list(range(num_experts - max(1, num_experts // 4), num_experts))


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The router (``gate``, gpt-oss ``router``) of every MoE block of an unconverted model, in module order."""
    out = []
    for module in model.modules():
        family = family_of(module)
        if family is not None:
            out.append(getattr(module, family.router))
    return out


@torch.no_grad()
def set_router(model: nn.Module, sizes: ModelSizes, skew: float, seed: int) -> None:
    """Point the routers, in place: a pure function of the weights, the sizes, ``skew`` and ``seed``.

    Step 1 (``skew`` > 0 only): a shared direction in every token embedding. Step 2, block by block (a block's input
    depends on the routing of the blocks before it): the mean direction m of the router's input over a probe
    batch; every router row loses its share along m (so no expert is favoured by what all tokens share, the fresh
    router's main source of imbalance), then the hot experts' rows get ``a * m`` with ``a`` chosen so that their
    logits rise by ``skew`` standard deviations of the logits over the probe tokens."""
    routers = moe_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE block of a registered family")
    gen = torch.Generator().manual_seed(seed + 7919)
    if skew > 0:
        embedding = model.get_input_embeddings().weight                 # [V, H]
        u_H = torch.randn(embedding.shape[1], generator=gen, dtype=embedding.dtype)
        embedding += float(embedding.std()) * math.sqrt(embedding.shape[1]) * u_H / u_H.norm()
    probe_BS = torch.randint(0, sizes.vocab_size, (sizes.batch_size, sizes.seq_len), generator=gen)
    for router in routers:
        seen: list[torch.Tensor] = []
        handle = router.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        try:
            model(probe_BS)
        finally:
            handle.remove()
        x_TH, w_EH = seen[0], router.weight
        m_H = x_TH.mean(0)
        m_H /= m_H.norm()
        w_EH -= (w_EH @ m_H)[:, None] * m_H[None, :]
        spread = float((x_TH @ w_EH.t()).std())                       # logits over the probe tokens, all experts
        w_EH[hot_experts(w_EH.shape[0])] += skew * spread / float((x_TH @ m_H).mean()) * m_H


def bench_model(family: str, num_experts: int, sizes: ModelSizes, router: str, seed: int,
                skew: float = 1.5, learn_steps: int = LEARN_STEPS, zipf: float = LEARN_ZIPF) -> nn.Module:
    """The tiny ``family`` model, float32, random-init from ``seed`` (the same in every process), its router
    fresh (``"uniform"``), skewed by ``skew`` (``"skewed"``) or trained ``learn_steps`` steps on the Markov chain of
    token frequencies ``zipf`` (``"learned"``)."""
    from transformers import AutoModelForCausalLM

    if router not in ROUTERS:
        raise ValueError(f"router={router!r} is not one of {', '.join(ROUTERS)}")
    config = tiny_config(family, num_experts, sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    set_router(model, sizes, skew if router == "skewed" else 0.0, seed)
    if router == "learned":
        model.load_state_dict(learned_state(family, num_experts, sizes, seed, learn_steps, zipf))
    return model


@functools.lru_cache(maxsize=8)
def learned_state(family: str, num_experts: int, sizes: ModelSizes, seed: int, steps: int,
                  zipf: float = LEARN_ZIPF) -> dict[str, torch.Tensor]:
    """The weights of the ``"uniform"`` model after ``steps`` steps of AdamW (lr ``LEARN_LR``, no balancing loss) on
    the Markov chain of ``seed`` and ``zipf`` (``rank_tokens(..., "learned")``'s source), one process, one thread:
    the same in every process. Cached per process (the benchmark computes it before it forks its ranks, with every
    argument given, as ``bench_model`` gives them)."""
    from largeep_plugin.models.synthetic import MarkovChainData

    model = bench_model(family, num_experts, sizes, "uniform", seed)
    data = MarkovChainData(sizes.vocab_size, seed=seed, zipf=zipf)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARN_LR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float results in every process
    try:
        for step in range(steps):
            ids_BS, _ = data.batch(sizes.batch_size, sizes.seq_len, rank=0, step=step)
            model(input_ids=ids_BS, labels=ids_BS).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rank_tokens(sizes: ModelSizes, rank: int, seed: int, router: str = "uniform",
                zipf: float = LEARN_ZIPF) -> torch.Tensor:
    """int64 [B, S] token ids of ``rank`` (seeded by rank: the same for every variant); they are the labels too.
    ``"learned"``: a batch of the Markov chain the model learned (``seed``, ``zipf``; unseen in its training), else
    uniform ids."""
    if router == "learned":
        from largeep_plugin.models.synthetic import MarkovChainData

        data = MarkovChainData(sizes.vocab_size, seed=seed, zipf=zipf)
        return data.batch(sizes.batch_size, sizes.seq_len, rank=rank, step=10**6 + rank)[0]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return torch.randint(0, sizes.vocab_size, (sizes.batch_size, sizes.seq_len), generator=gen)
