"""Encoder-decoder Transformer: Vaswani et al. 2017, T5 (Raffel et al. 2020; v1.0 and v1.1) and the
Switch Transformer as published (Fedus et al. 2021: T5 with a Switch FFN in every other block).

One token embedding serves the encoder, the decoder and (tied) the output head. The encoder's
self-attention is bidirectional; each decoder block attends causally to the targets so far, then
to the encoder's output (cross-attention), then runs its FFN. The config picks the family:
sinusoidal positions, post-LayerNorm, ReLU and sqrt(d_model)-scaled embeddings (Vaswani), or
T5's per-stack relative position buckets, pre-RMSNorm without biases, unscaled attention scores,
ReLU (v1.0) or gated GELU (v1.1), and `moe` for Switch. Attention, MLP and the Switch layer are
GPT's own (attention.py, gpt.py, moe.py). Written for one device, like gpt.py.

model(inputs, targets) shifts the targets right behind `decoder_start_token_id` to make the
decoder's inputs; model(inputs, decoder_inputs=ids) takes them as given (teacher forcing);
model(inputs, decoder_inputs=ids, cache=model.new_cache()) decodes: the encoder runs on the first
call only, cross-attention projects its output once, and each call's ids continue the cached ones.
There is no encoder-only call.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.model.attention import Attention, KVCache, LayerCache, RelativePositionBias
from trainer.model.gpt import MLP, GPTOutput, InitByRule, lm_output, residual_init_std
from trainer.model.loss import LMHead
from trainer.model.moe import MoEStats, SwitchFFN


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)


def switch_ffn(cfg: ModelConfig, layer: int) -> SwitchFFN:
    """The Switch layer of block `layer` (numbered across both stacks), initialised by the model's scheme."""
    if cfg.init == "t5":  # fan-in scaling, as the dense FFN it replaces
        std, out_std = cfg.d_model ** -0.5, cfg.expert_ff_width ** -0.5
    else:
        std, out_std = cfg.init_std, residual_init_std(cfg)
    return SwitchFFN(cfg.d_model, cfg.expert_ff_width, cfg.moe, layer=layer, bias=cfg.bias,
                     activation=cfg.activation, init_std=std, out_init_std=out_std)


class Block(nn.Module):
    """Self-attention, cross-attention (decoder blocks), FFN: each a residual branch. Pre-norm normalises
    the branch's input (T5); post-norm normalises the sum (Vaswani)."""

    def __init__(self, cfg: ModelConfig, layer: int, decoder: bool, moe_layer_id: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg, causal=decoder, fused_qkv=False)
        if decoder:
            self.ln_cross = make_norm(cfg)
            self.cross_attn = Attention(cfg, causal=False, fused_qkv=False)
        self.ln_2 = make_norm(cfg)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = switch_ffn(cfg, moe_layer_id) if self.is_moe else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _branch_input(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return x if self.post_norm else norm(x)

    def _add(self, x: torch.Tensor, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        x = x + self.drop(h)
        return norm(x) if self.post_norm else x

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
                cache: Optional[tuple[LayerCache, LayerCache]] = None) -> tuple[torch.Tensor, Optional[MoEStats]]:
        """cache: decoding, this block's (self-attention, cross-attention) caches."""
        self_cache, cross_cache = cache or (None, None)
        x = self._add(x, self.attn(self._branch_input(x, self.ln_1), bias=bias, cache=self_cache), self.ln_1)
        if memory is not None:
            h = self.cross_attn(self._branch_input(x, self.ln_cross), memory, cache=cross_cache)
            x = self._add(x, h, self.ln_cross)
        h = self._branch_input(x, self.ln_2)
        h, stats = self.mlp(h, decoding=cache is not None) if self.is_moe else (self.mlp(h), None)
        return self._add(x, h, self.ln_2), stats


class Stack(nn.Module):
    """The encoder (decoder=False) or the decoder: blocks sharing one relative position bias, and a final
    norm when the blocks are pre-norm."""

    def __init__(self, cfg: ModelConfig, decoder: bool):
        super().__init__()
        self.decoder = decoder
        if cfg.pos_embedding == "relative":
            self.relative_bias = RelativePositionBias(cfg, bidirectional=not decoder)
        first_layer = cfg.encoder_layers if decoder else 0  # MoE layers are numbered encoder first
        n_layer = cfg.n_layer if decoder else cfg.encoder_layers
        self.h = nn.ModuleList(Block(cfg, i, decoder, first_layer + i) for i in range(n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.drop = nn.Dropout(cfg.dropout)

    def position_bias(self, T: int, past: int = 0) -> Optional[torch.Tensor]:
        """(1, n_head, T, past + T) relative bias of T queries after `past` cached positions, -inf on future
        keys in the decoder; None without one."""
        if not hasattr(self, "relative_bias"):
            return None
        bias = self.relative_bias(T, past + T, past)
        if self.decoder:
            future = torch.ones(T, past + T, dtype=torch.bool, device=bias.device).triu(1 + past)
            bias = bias.masked_fill(future, float("-inf"))
        return bias

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, list[MoEStats]]:
        bias = self.position_bias(x.shape[1], 0 if cache is None else len(cache))
        moe_stats = []
        for i, block in enumerate(self.h):
            x, stats = block(x, bias, memory, None if cache is None else (cache.self_attn[i], cache.cross_attn[i]))
            if stats is not None:
                moe_stats.append(stats)
        if self.ln_f is not None:
            x = self.drop(self.ln_f(x))
        return x, moe_stats


class EncoderDecoder(InitByRule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss_chunk_tokens)
        # Tied: the table is the head's weight, so its own is never allocated.
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, device="meta" if cfg.tie_embeddings else None)
        if cfg.tie_embeddings:
            self.wte.weight = lm_head.weight
        if cfg.pos_embedding == "sinusoidal":  # a non-persistent buffer: no parameters, nothing in checkpoints
            self.register_buffer("pos_table", torch.empty(cfg.n_ctx, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = lm_head
        self.reset_parameters()
        self.init_buffers()

    def init_rule(self, name: str) -> tuple[float, float]:
        """(mean, std) parameter `name` starts from: norm weights 1, biases 0, a Switch layer's own rule for
        its router and experts; matrices by `cfg.init`: GPT-2's N(0, init_std) with residual projections
        scaled by 1/sqrt(2 n_layer), or T5's fan_in**-0.5 (queries also d_kv**-0.5, since T5 does not scale
        attention scores; embeddings 1; relative bias d_model**-0.5, as Hugging Face's T5)."""
        if ".mlp." in name:
            block_name, _, rest = name.partition(".mlp.")
            if self.get_submodule(block_name).is_moe:
                return self.get_submodule(block_name).mlp.init_rule(rest)
        module_name, _, leaf = name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return (1.0 if leaf == "weight" else 0.0), 0.0
        if leaf == "bias":
            return 0.0, 0.0
        if self.cfg.init == "gpt2":
            return 0.0, residual_init_std(self.cfg) if name.endswith("c_proj.weight") else self.cfg.init_std
        if isinstance(module, nn.Embedding):
            return 0.0, self.cfg.d_model ** -0.5 if module_name.endswith("relative_bias.table") else 1.0
        if module_name == "lm_head":
            return 0.0, 1.0
        std = module.in_features ** -0.5  # in_features: ZeRO-3 leaves the weight itself empty
        return 0.0, std * self.cfg.head_dim ** -0.5 if module_name.endswith("q_attn") else std

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, encoder's then decoder's: what activation checkpointing wraps."""
        return [*self.encoder.h, *self.decoder.h]

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); non_embedding leaves out the token table, an untied
        head and the relative position tables."""
        params = dict(self.named_parameters())
        n = sum(p.numel() for p in params.values())
        if non_embedding:
            n -= sum(p.numel() for name, p in params.items()
                     if name in ("wte.weight", "lm_head.weight") or name.endswith("relative_bias.table.weight"))
        return n

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer, cross=True)

    def embed(self, idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Token (and sinusoidal position) embeddings of idx, whose first token is at position `past`."""
        x = self.wte(idx)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        if self.cfg.pos_embedding == "sinusoidal":
            end = past + idx.shape[1]
            if end > self.cfg.n_ctx:
                raise ValueError(f"sequence length {end} exceeds the position table n_ctx={self.cfg.n_ctx}")
            x = x + self.pos_table[past:end]
        return self.drop(x)

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """The decoder's inputs: decoder_start_token_id, then the targets but the last. A -1 (no target)
        reads as the start token, as Hugging Face reads its -100 as the pad token (T5: the same id)."""
        start = targets.new_full((targets.shape[0], 1), self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, targets[:, :-1]], dim=1)
        return shifted.masked_fill(shifted < 0, self.cfg.decoder_start_token_id)

    def forward(self, inputs: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                decoder_inputs: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> GPTOutput:
        """inputs (B, S) encoder ids; targets (B, T) with -1 where there is no target; logits (B, T, V);
        cache: decoding (see the module docstring)."""
        if decoder_inputs is None:
            if targets is None:
                raise ValueError("EncoderDecoder needs targets (shifted right into the decoder) or decoder_inputs")
            decoder_inputs = self.shift_right(targets)
        if cache is not None and cache.memory is not None:  # later decoding steps: the encoder has run
            memory, encoder_stats = cache.memory, []
        else:
            memory, encoder_stats = self.encoder(self.embed(inputs))
        if cache is not None:
            cache.memory = memory
        past = 0 if cache is None else len(cache)
        x, decoder_stats = self.decoder(self.embed(decoder_inputs, past), memory, cache)
        if self.cfg.scale_decoder_output:
            x = x * self.cfg.d_model ** -0.5
        return lm_output(self.cfg, self.lm_head, x, targets, encoder_stats + decoder_stats)
