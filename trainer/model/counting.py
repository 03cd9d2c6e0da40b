"""Parameter counts and training FLOPs, computed from the config alone.

Nothing here builds a model, so a 175B GPT-3 or a 2048-expert Switch-C is answered instantly.
The counts equal `GPT(cfg).num_params()`, `EncoderDecoder(cfg).num_params()` and `BERT(cfg).num_params()`
exactly (tests hold them to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import ModelConfig
from trainer.masked_lm import PREDICT_RATE


@dataclass(frozen=True)
class ParamCounts:
    total: int  # unique parameters; the tied LM head counts once
    active: int  # used per token: MoE layers count one expert (plus the router)
    non_embedding: int  # total without token and position embeddings
    embedding: int  # token table, an untied output head, learned position tables (relative ones too), token types
    expert: int  # all expert weights (what expert parallelism shards)


def _ffn_params(d_model: int, d_ff: int, bias: bool, gated: bool = False) -> int:
    fc_width = 2 * d_ff if gated else d_ff  # gated GELU: the gate's and the linear half's weights
    return d_model * (fc_width + d_ff) + (fc_width + d_model if bias else 0)


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model if cfg.norm == "rmsnorm" or not cfg.bias else 2 * cfg.d_model


def _attention_params(cfg: ModelConfig) -> int:
    inner = cfg.n_head * cfg.head_dim
    return 4 * cfg.d_model * inner + (3 * inner + cfg.d_model if cfg.bias else 0)


def _layer_params(cfg: ModelConfig, layer: int, cross: bool = False) -> tuple[int, int, int]:
    """(dense params, expert params, params of one expert) of block `layer` of its stack; `cross`: a
    decoder block of the encoder-decoder (a third norm and the cross-attention)."""
    d, b = cfg.d_model, cfg.bias
    norms = (3 if cross else 2) * _norm_params(cfg)
    attention = (2 if cross else 1) * _attention_params(cfg)
    if not cfg.is_moe_layer(layer):
        return norms + attention + _ffn_params(d, cfg.ff_width, b, cfg.activation == "gated-gelu"), 0, 0
    one_expert = _ffn_params(d, cfg.expert_ff_width, b)
    router = (d + cfg.moe.router_bias) * cfg.moe.num_experts
    return norms + attention + router, cfg.moe.num_experts * one_expert, one_expert


def _bert_heads(cfg: ModelConfig) -> int:
    """BERT's embedding norm, MLM head (dense, norm, output bias: its matrix is the token table), pooler and
    NSP classifier."""
    d, b = cfg.d_model, cfg.bias
    return 2 * _norm_params(cfg) + 2 * (d * d + d * b) + cfg.vocab_size * b + 2 * d + 2 * b


def _blocks(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    if cfg.arch != "encoder_decoder":
        return [_layer_params(cfg, i) for i in range(cfg.n_layer)]
    return [_layer_params(cfg, i) for i in range(cfg.encoder_layers)] + [
        _layer_params(cfg, i, cross=True) for i in range(cfg.n_layer)]


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, stacks = cfg.d_model, 2 if cfg.arch == "encoder_decoder" else 1
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    embedding += cfg.n_ctx * d if cfg.pos_embedding == "learned" else 0
    embedding += stacks * cfg.relative_buckets * cfg.n_head if cfg.pos_embedding == "relative" else 0
    embedding += cfg.type_vocab_size * d if cfg.arch == "encoder" else 0
    final_norms = stacks * _norm_params(cfg) if cfg.norm_position == "pre" else 0
    heads = _bert_heads(cfg) if cfg.arch == "encoder" else 0
    layers = _blocks(cfg)
    dense = embedding + final_norms + heads + sum(dense for dense, _, _ in layers)
    expert = sum(e for _, e, _ in layers)
    active_expert = sum(one for _, _, one in layers)
    return ParamCounts(total=dense + expert, active=dense + active_expert,
                       non_embedding=dense + expert - embedding, embedding=embedding, expert=expert)


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward) = 6*N + 12 * sum over layers of attention width * ctx.

    N is the active non-embedding parameter count (one expert per MoE layer) plus vocab*d_model
    for the LM head matmul (tied, so not in N's parameters but still computed). The second term is
    the attention score and value matmuls (Kaplan et al. 2020; PaLM's 12*L*d*T, causal masking
    not discounted; the width is n_head * d_kv, d_model unless d_kv says otherwise): ctx = seq_len
    (default n_ctx) for dense layers and min(local_window, seq_len) for GPT-3's banded layers.
    An encoder-decoder's token is one input and one target position (both seq_len long): every
    parameter is used once per token, and a decoder block attends twice (itself, then the encoder).
    BERT attends over all T positions; its MLM head (dense layer and output matrix) runs at the 15% of
    positions it predicts (it gathers them), and its pooler counts at every position (1/T too much).
    """
    T = seq_len or cfg.n_ctx
    counts = param_counts(cfg)
    n = counts.active - counts.embedding + cfg.vocab_size * cfg.d_model
    if cfg.arch == "encoder":
        n -= (1 - PREDICT_RATE) * cfg.d_model * (cfg.d_model + cfg.vocab_size)
    if cfg.arch == "encoder_decoder":
        ctx_sum = (cfg.encoder_layers + 2 * cfg.n_layer) * T
    else:
        banded = cfg.n_layer // 2 if cfg.attention == "alternating" else 0
        ctx_sum = (cfg.n_layer - banded) * T + banded * min(cfg.local_window, T)
    return 6.0 * n + 12.0 * cfg.n_head * cfg.head_dim * ctx_sum
