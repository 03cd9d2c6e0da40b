"""Parameter counts and training FLOPs, computed from the config alone.

Nothing here builds a model, so a 175B GPT-3 or a 2048-expert Switch-C is answered instantly.
The counts equal `GPT(cfg).num_params()`, `EncoderDecoder(cfg).num_params()` and `BERT(cfg).num_params()`
exactly (tests hold them to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer import span_corruption
from trainer.config import ModelConfig, SpanCorruptionConfig, TrainConfig
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


@dataclass(frozen=True)
class Example:
    """One training sequence: the positions the encoder reads (a decoder-only model: its sequence), the
    positions the decoder predicts, and the raw tokens it takes from the shards (what the trainer's
    `tokens`, tokens/s and MFU count: T5's span corruption turns 568 raw tokens into 512 inputs and 114
    targets)."""

    inputs: int
    targets: int
    raw_tokens: int


def training_example(cfg: ModelConfig, seq_len: Optional[int] = None, train: Optional[TrainConfig] = None) -> Example:
    """The example `train.objective` makes of `seq_len` (default train.seq_len, else n_ctx) input positions.
    Without a train section an encoder-decoder is taken to train on span corruption at T5's settings."""
    seq = seq_len or (train.seq_len if train is not None else cfg.n_ctx)
    objective = train.objective if train is not None else "span_corruption"
    if cfg.arch == "decoder" or objective == "causal_lm":
        return Example(seq, seq, seq)
    if cfg.arch == "encoder":  # [CLS] A [SEP] B [SEP]: three positions are not raw tokens
        return Example(seq, seq, seq - 3)
    s = train.span_corruption if train is not None else SpanCorruptionConfig()
    raw, targets = span_corruption.random_spans_lengths(seq, s.noise_density, s.mean_noise_span_length)
    return Example(seq, targets, raw)


def _decoder_flops_per_token(cfg: ModelConfig, T: int) -> int:
    banded = cfg.n_layer // 2 if cfg.attention == "alternating" else 0
    ctx_sum = (cfg.n_layer - banded) * T + banded * min(cfg.local_window, T)
    counts = param_counts(cfg)
    n = counts.active - counts.embedding + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.n_head * cfg.head_dim * ctx_sum


def _encoder_decoder_flops(cfg: ModelConfig, ex: Example) -> int:
    """Each stack's active parameters once per position of its own: the encoder's (and the decoder's
    cross-attention keys and values) per input, the rest of the decoder and the head per target."""
    S, T, layers = ex.inputs, ex.targets, _blocks(cfg)
    encoder = sum(dense + one for dense, _, one in layers[:cfg.encoder_layers])
    decoder = sum(dense + one for dense, _, one in layers[cfg.encoder_layers:])
    final_norm = _norm_params(cfg) if cfg.norm_position == "pre" else 0
    inner = cfg.n_head * cfg.head_dim
    cross_kv = cfg.n_layer * (2 * cfg.d_model * inner + (2 * inner if cfg.bias else 0))
    per_input = encoder + final_norm + cross_kv
    per_target = decoder + final_norm - cross_kv + cfg.vocab_size * cfg.d_model
    scores = cfg.encoder_layers * S * S + cfg.n_layer * (T * T + T * S)  # query-key pairs of all attentions
    return 6 * (per_input * S + per_target * T) + 12 * inner * scores


def flops_per_example(cfg: ModelConfig, ex: Example) -> int:
    """Training FLOPs (forward + backward) of one example: 6 FLOPs per active parameter and position that
    uses it, plus 12 per query-key pair and attention channel (the score and value matmuls)."""
    if cfg.arch == "decoder":
        return _decoder_flops_per_token(cfg, ex.inputs) * ex.inputs
    if cfg.arch == "encoder":  # BERT's MLM head (dense layer and output matrix) runs only where it predicts
        unpredicted = (1 - PREDICT_RATE) * cfg.d_model * (cfg.d_model + cfg.vocab_size)
        return (_decoder_flops_per_token(cfg, ex.inputs) - 6 * unpredicted) * ex.inputs
    return _encoder_decoder_flops(cfg, ex)


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, train: Optional[TrainConfig] = None) -> float:
    """Training FLOPs (forward + backward) per raw token: `flops_per_example` over the example's raw tokens,
    the tokens the trainer's MFU counts.

    Decoder: 6*N + 12 * sum over layers of attention width * ctx, where N is the active non-embedding
    parameter count (one expert per MoE layer) plus vocab*d_model for the LM head matmul (tied, so
    not in N's parameters but still computed). The second term is the attention score and value
    matmuls (Kaplan et al. 2020; PaLM's 12*L*d*T, causal masking not discounted; the width is
    n_head * d_kv, d_model unless d_kv says otherwise): ctx = seq_len (default n_ctx) for dense
    layers and min(local_window, seq_len) for GPT-3's banded layers.
    Encoder-decoder: the encoder's parameters (and each decoder block's cross-attention key and value
    projections, which read the encoder's output) count once per input position, the rest of the
    decoder and the head once per target position; each encoder layer attends inputs x inputs, each
    decoder layer targets x targets and targets x inputs. Without a train config the example is T5's
    span corruption of seq_len inputs (512 -> 114 targets from 568 raw tokens).
    BERT: the decoder's formula over all T positions (attention is bidirectional, not cheaper), less the
    MLM head at the 85% of positions it does not predict; its pooler counts at every position.
    """
    ex = training_example(cfg, seq_len, train)
    return flops_per_example(cfg, ex) / ex.raw_tokens
