"""Parameter counts and training FLOPs, computed from the config alone.

Nothing here builds a model, so a 175B GPT-3 or a 2048-expert Switch-C is answered instantly.
The counts equal `GPT(cfg).num_params()` exactly (tests hold them to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # unique parameters; the tied LM head counts once
    active: int  # used per token: MoE layers count one expert (plus the router)
    non_embedding: int  # total without token and position embeddings
    embedding: int  # token table plus a learned position table
    expert: int  # all expert weights (what expert parallelism shards)


def _ffn_params(d_model: int, d_ff: int, bias: bool) -> int:
    return 2 * d_model * d_ff + (d_ff + d_model if bias else 0)


def _layer_params(cfg: ModelConfig, layer: int) -> tuple[int, int, int]:
    """(dense params, expert params, params of one expert) of block `layer`."""
    d, b = cfg.d_model, cfg.bias
    norms = 2 * (2 * d if b else d)
    attention = 4 * d * d + (4 * d if b else 0)
    if not cfg.is_moe_layer(layer):
        return norms + attention + _ffn_params(d, cfg.ff_width, b), 0, 0
    one_expert = _ffn_params(d, cfg.expert_ff_width, b)
    router = d * cfg.moe.num_experts
    return norms + attention + router, cfg.moe.num_experts * one_expert, one_expert


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d = cfg.d_model
    embedding = cfg.vocab_size * d + (cfg.n_ctx * d if cfg.pos_embedding == "learned" else 0)
    final_norm = 2 * d if cfg.bias else d
    layers = [_layer_params(cfg, i) for i in range(cfg.n_layer)]
    dense = embedding + final_norm + sum(dense for dense, _, _ in layers)
    expert = sum(e for _, e, _ in layers)
    active_expert = sum(one for _, _, one in layers)
    return ParamCounts(total=dense + expert, active=dense + active_expert,
                       non_embedding=dense + expert - embedding, embedding=embedding, expert=expert)


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward) = 6*N + 12 * sum over layers of d_model * ctx.

    N is the active non-embedding parameter count (one expert per MoE layer) plus vocab*d_model
    for the LM head matmul (tied, so not in N's parameters but still computed). The second term is
    the attention score and value matmuls (Kaplan et al. 2020; PaLM's 12*L*d*T, causal masking
    not discounted): ctx = seq_len (default n_ctx) for dense layers and min(local_window, seq_len)
    for GPT-3's banded layers.
    """
    T = seq_len or cfg.n_ctx
    counts = param_counts(cfg)
    n = counts.active - counts.embedding + cfg.vocab_size * cfg.d_model
    banded = cfg.n_layer // 2 if cfg.attention == "alternating" else 0
    ctx_sum = (cfg.n_layer - banded) * T + banded * min(cfg.local_window, T)
    return 6.0 * n + 12.0 * cfg.d_model * ctx_sum
