"""Counting formulas: parameters, FLOPs per token, bytes per token. Pure functions of a ModelSpec.

Conventions (the doc's "Formulas" section repeats them):
- A GEMM with P weights costs 2 P FLOPs per token forward; backward costs twice the forward (input and weight
  gradients), so a training step costs 3x the forward ("model FLOPs", recomputation not counted).
- Attention core (QK^T and AV) per query token and per key: 2 (d_qk + d_v) FLOPs per head. A causal training
  sequence of S tokens attends to S/2 keys on average.
- Norm weights and biases are left out (< 0.01% of parameters).
- The embedding lookup is not a GEMM; the output layer is (V x H), counted in FLOPs.
"""
from __future__ import annotations

from largeep_plugin.perfmodel.specs import BYTES_PER_ELEMENT, ModelSpec


# ---- parameters ------------------------------------------------------------------------------------------------
def attention_params(m: ModelSpec) -> int:
    """Weights of one attention block (Q, K, V, O projections; MLA's down/up projections)."""
    a, h = m.attention, m.hidden_size
    if a.kind == "gqa":
        q = a.num_heads * a.head_dim
        kv = a.kv_heads * a.head_dim
        return h * q + 2 * h * kv + q * h
    d_qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = (h * a.q_lora_rank + a.q_lora_rank * a.num_heads * d_qk) if a.q_lora_rank else h * a.num_heads * d_qk
    kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim
                                                                                     + a.v_head_dim)
    o = a.num_heads * a.v_head_dim * h
    return q + kv + o


def expert_params(m: ModelSpec) -> int:
    """Weights of one routed expert: matrices x H x F."""
    return 0 if m.moe is None else m.moe.matrices * m.hidden_size * m.moe.ffn_hidden_size


def shared_expert_params(m: ModelSpec) -> int:
    """Weights of all shared experts of one MoE layer."""
    if m.moe is None:
        return 0
    return m.moe.num_shared_experts * m.moe.matrices * m.hidden_size * m.moe.shared_ffn_hidden_size


def dense_ffn_params(m: ModelSpec) -> int:
    """Weights of the FFN of one dense layer."""
    return m.dense_matrices * m.hidden_size * m.dense_ffn_hidden_size


def router_params(m: ModelSpec) -> int:
    return 0 if m.moe is None else m.hidden_size * m.moe.num_experts


def layer_params(m: ModelSpec, index: int) -> int:
    """All weights of layer `index`."""
    if m.is_moe_layer(index):
        ffn = m.moe.num_experts * expert_params(m) + shared_expert_params(m) + router_params(m)
    else:
        ffn = dense_ffn_params(m)
    return attention_params(m) + ffn


def layer_active_params(m: ModelSpec, index: int) -> int:
    """Weights one token multiplies through in layer `index` (top-k routed experts, not all E)."""
    if m.is_moe_layer(index):
        ffn = m.moe.top_k * expert_params(m) + shared_expert_params(m) + router_params(m)
    else:
        ffn = dense_ffn_params(m)
    return attention_params(m) + ffn


def embedding_params(m: ModelSpec) -> int:
    """Input embedding plus output layer (one matrix when tied)."""
    return m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)


def total_params(m: ModelSpec) -> int:
    return sum(layer_params(m, i) for i in range(m.num_layers)) + embedding_params(m)


def active_params(m: ModelSpec) -> int:
    """Weights used per token, including the output layer and excluding the embedding lookup."""
    return sum(layer_active_params(m, i) for i in range(m.num_layers)) + m.vocab_size * m.hidden_size


# ---- FLOPs -----------------------------------------------------------------------------------------------------
def attention_core_flops(m: ModelSpec, keys: float) -> float:
    """Forward FLOPs of QK^T and AV for one query token attending to `keys` keys, one layer."""
    a = m.attention
    if a.kind == "gqa":
        return 2.0 * keys * a.num_heads * (2 * a.head_dim)
    return 2.0 * keys * a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)


def mean_keys(m: ModelSpec, seq_len: int, causal: bool | None = None) -> float:
    """Keys a query attends to on average in a training sequence: S/2 if causal, else S."""
    c = m.attention.causal if causal is None else causal
    return seq_len / 2.0 if c else float(seq_len)


def forward_flops_per_token(m: ModelSpec, seq_len: int, causal: bool | None = None) -> float:
    """Forward FLOPs per token of a training sequence of seq_len tokens: 2 x active params + attention core."""
    return 2.0 * active_params(m) + m.num_layers * attention_core_flops(m, mean_keys(m, seq_len, causal))


def training_flops_per_token(m: ModelSpec, seq_len: int, causal: bool | None = None) -> float:
    """Model FLOPs per trained token: 3 x forward (backward = 2 x forward); recomputation not counted."""
    return 3.0 * forward_flops_per_token(m, seq_len, causal)


# ---- bytes -----------------------------------------------------------------------------------------------------
def kv_cache_bytes_per_token(m: ModelSpec, precision: str = "bf16") -> float:
    """KV-cache bytes one token occupies over all layers: 2 x kv_heads x head_dim (GQA), or the compressed
    latent plus the shared RoPE key (MLA)."""
    a, b = m.attention, BYTES_PER_ELEMENT[precision]
    per_layer = 2 * a.kv_heads * a.head_dim if a.kind == "gqa" else a.kv_lora_rank + a.qk_rope_head_dim
    return float(per_layer * b * m.num_layers)


def dispatch_bytes_per_token(m: ModelSpec, precision: str = "bf16") -> float:
    """Bytes one token sends in the dispatch all-to-all of one MoE layer, counting all top-k copies (the copy
    to an expert on the sender's own GPU included); the combine returns the same amount."""
    return 0.0 if m.moe is None else float(m.moe.top_k * m.hidden_size * BYTES_PER_ELEMENT[precision])


def remote_copy_fractions(ep: int, ep_per_node: int) -> tuple[float, float]:
    """(fraction to other GPUs of the same node, fraction to other nodes) of a token's copies, for uniform
    routing over an EP group of `ep` ranks with `ep_per_node` of them on each node."""
    if ep <= 1:
        return 0.0, 0.0
    return (ep_per_node - 1) / ep, (ep - ep_per_node) / ep


def distinct_remote_nodes(top_k: int, ep_nodes: int, max_nodes_per_token: int = 0) -> float:
    """Expected number of *other* nodes a token's top_k experts live on (what a node-batched dispatch sends over
    the inter-node links), for uniform routing over `ep_nodes` nodes; node-limited routing caps the nodes
    at max_nodes_per_token (0 = no cap), the token's own node counting as any other."""
    if ep_nodes <= 1:
        return 0.0
    n = min(ep_nodes, max_nodes_per_token) if max_nodes_per_token else ep_nodes
    distinct = n * (1.0 - (1.0 - 1.0 / n) ** top_k)
    return distinct * (ep_nodes - 1) / ep_nodes


def elementwise_bytes_per_token(m: ModelSpec, index: int, act_bytes: int, fp8_gemms: bool = False) -> float:
    """HBM bytes the memory-bound kernels of layer `index` move per token in the forward pass: two norms, two
    residual adds, RoPE, permute/unpermute, the activation function; with FP8 GEMMs also the casts of each GEMM
    input (read 16 bit, write 8 bit). The backward moves about twice this."""
    h, a, moe = m.hidden_size, m.attention, m.moe
    total = 4 * h + 6 * h  # norms: read+write H each; residual adds: read 2H, write H each
    if a.kind == "gqa":
        total += 2 * (a.num_heads + a.kv_heads) * a.head_dim
        o_dim = a.num_heads * a.head_dim
    else:
        total += 2 * (a.num_heads + 1) * a.qk_rope_head_dim
        o_dim = a.num_heads * a.v_head_dim
    if m.is_moe_layer(index):
        k = moe.top_k
        total += (1 + k) * h * 2  # permute and unpermute-with-weighted-sum
        total += k * moe.matrices * moe.ffn_hidden_size
        total += moe.num_shared_experts * moe.matrices * moe.shared_ffn_hidden_size
        gemm_inputs = h + o_dim + k * h + k * moe.ffn_hidden_size
    else:
        total += m.dense_matrices * m.dense_ffn_hidden_size
        gemm_inputs = h + o_dim + h + m.dense_ffn_hidden_size
    out = float(total * act_bytes)
    if fp8_gemms:
        out += gemm_inputs * (act_bytes + 1)
    return out


def activation_bytes_per_token(m: ModelSpec, index: int, recompute: str, act_bytes: int,
                               fp8_gemms: bool = False) -> float:
    """Bytes of activations layer `index` keeps per token between forward and backward.

    none: the two residual inputs, every GEMM input (in FP8 when the GEMMs are FP8, as Transformer Engine keeps
    them), q, k, v for flash attention, the expert FFN intermediates, the fp32 router probabilities.
    selective: the norms and the expert activation function are recomputed, and so are MLA's up-projections,
    so their outputs are not kept. full: only the layer input is kept (the caller adds one layer's working
    set once).
    """
    h, a, moe = m.hidden_size, m.attention, m.moe
    if recompute == "full":
        return float(h * act_bytes)
    gb = 1 if fp8_gemms else act_bytes  # bytes per saved GEMM input
    selective = recompute == "selective"
    kept = 2 * h * act_bytes  # residual-stream inputs of the two norms
    norms = 2 * h * gb        # norm outputs: inputs of the QKV GEMM and of the router / FFN GEMMs
    if a.kind == "gqa":
        q, kv, o = a.num_heads * a.head_dim, a.kv_heads * a.head_dim, a.num_heads * a.head_dim
        kept += (q + 2 * kv) * act_bytes + o * gb
    else:
        d_qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        kept += (a.q_lora_rank + a.kv_lora_rank) * gb + a.qk_rope_head_dim * act_bytes
        kept += a.num_heads * a.v_head_dim * (act_bytes + gb)  # core output (O GEMM input) and v
        if not selective:
            kept += a.num_heads * 2 * d_qk * act_bytes  # q and k after the up-projections
    if m.is_moe_layer(index):
        k, f = moe.top_k, moe.ffn_hidden_size
        fs = moe.num_shared_experts * moe.shared_ffn_hidden_size
        kept += k * h * gb + k * h * act_bytes  # permuted expert inputs; expert outputs for the combine weights
        kept += (k * f + fs) * (moe.matrices - 1) * act_bytes  # fc1 outputs (activation inputs)
        act_out = (k * f + fs) * gb  # activation outputs: fc2 inputs
        kept += 4.0 * moe.num_experts  # fp32 router probabilities
    else:
        kept += m.dense_ffn_hidden_size * (m.dense_matrices - 1) * act_bytes
        act_out = m.dense_ffn_hidden_size * gb
    if not selective:
        kept += act_out + norms
    return float(kept)


def attention_up_projection_params(m: ModelSpec) -> int:
    """MLA's up-projection weights (latent -> per-head q, k, v), which selective recomputation re-runs; 0 for GQA."""
    a = m.attention
    if a.kind != "mla":
        return 0
    d_qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q_up = a.q_lora_rank * a.num_heads * d_qk if a.q_lora_rank else 0
    return q_up + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
