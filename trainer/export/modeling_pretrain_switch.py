"""A decoder-only Switch Transformer exported by `pretrain export hf`:
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. This file imports torch and
transformers only; the exporter copies it next to the weights.

It computes what the training checkpoint's model computes in eval mode: GPT-2 blocks (pre-LayerNorm, a
position table (a sinusoidal one is stored as the table), causal attention that is dense or, with
`attention: alternating`, locally banded in the odd blocks, tanh-GELU or ReLU MLPs, a head tied to the token
embedding), and in every `moe_every`-th block a top-1 Switch FFN. Its router (float32) picks one expert per
token; within each routing group ('batch': all tokens of the call, 'sequence', or N consecutive tokens)
the tokens routed to an expert take its `capacity` places in token order and the rest are dropped (they
pass through the residual); capacity is `expert_capacity`, else ceil(group tokens / experts x
(eval_)capacity_factor). Decoding with a cache (as `generate` does) drops no token: a capacity would make
a token's output depend on the tokens decoded with it. Training this model gives the cross-entropy only
(no router losses, no jitter).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output's cache field: `cache` since transformers 5.2x, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PretrainSwitchConfig(PretrainedConfig):
    model_type = "pretrain_switch"

    def __init__(self, vocab_size: int = 50257, max_position_embeddings: int = 2048, num_hidden_layers: int = 2,
                 num_attention_heads: int = 2, hidden_size: int = 64, head_dim: int = 32, d_ff: int = 256,
                 expert_d_ff: int = 256, activation: str = "gelu", bias: bool = True, layer_norm_eps: float = 1e-5,
                 attention: str = "dense", local_window: int = 256, num_experts: int = 4, moe_every: int = 2,
                 routing_group: str | int = "batch", capacity_factor: float = 1.25,
                 eval_capacity_factor: float = 2.0, expert_capacity: Optional[int] = None,
                 router_bias: bool = False, use_cache: bool = False, **kwargs):
        self.vocab_size, self.max_position_embeddings = vocab_size, max_position_embeddings
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_size, self.head_dim, self.d_ff, self.expert_d_ff = hidden_size, head_dim, d_ff, expert_d_ff
        self.activation, self.bias, self.layer_norm_eps = activation, bias, layer_norm_eps
        self.attention, self.local_window = attention, local_window
        self.num_experts, self.moe_every, self.routing_group = num_experts, moe_every, routing_group
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.expert_capacity, self.router_bias = expert_capacity, router_bias
        self.use_cache = use_cache  # off: a plain forward routes as training-time evaluation; generate passes a cache
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    return F.relu(x) if name == "relu" else F.gelu(x, approximate="tanh")


def causal_mask(q_len: int, past: int, window: Optional[int], device: torch.device) -> torch.Tensor:
    """(T, past + T) bool, True where query i (position past + i) may see key j: past + i - window < j <= past + i."""
    offset = (past + torch.arange(q_len, device=device))[:, None] - torch.arange(past + q_len, device=device)
    return (offset >= 0) & (offset < (window or past + q_len))


class Attention(nn.Module):
    def __init__(self, config: PretrainSwitchConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, config.num_attention_heads, config.head_dim
        self.inner = self.n_head * self.head_dim
        banded = config.attention == "alternating" and layer % 2 == 1
        self.window = config.local_window if banded else None
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.inner, bias=config.bias)
        self.c_proj = nn.Linear(self.inner, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(self.inner, dim=2))
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        past = k.shape[2] - T
        mask = causal_mask(T, past, self.window, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.inner))


class MLP(nn.Module):
    def __init__(self, config: PretrainSwitchConfig):
        super().__init__()
        self.activation = config.activation
        self.c_fc = nn.Linear(config.hidden_size, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor, decoding: bool) -> torch.Tensor:  # decoding: SwitchFFN's signature
        return self.c_proj(activation(self.c_fc(x), self.activation))


class Experts(nn.Module):
    """Weights stacked over experts: w_fc and w_proj (E, d_model, d_ff), b_fc (E, 1, d_ff), b_proj (E, 1, d_model)."""

    def __init__(self, config: PretrainSwitchConfig):
        super().__init__()
        E, d, ff = config.num_experts, config.hidden_size, config.expert_d_ff
        self.w_fc, self.w_proj = nn.Parameter(torch.empty(E, d, ff)), nn.Parameter(torch.empty(E, d, ff))
        self.b_fc = nn.Parameter(torch.empty(E, 1, ff)) if config.bias else None
        self.b_proj = nn.Parameter(torch.empty(E, 1, d)) if config.bias else None

    def forward(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        h = x @ self.w_fc[e] + (0 if self.b_fc is None else self.b_fc[e])
        return activation(h, name) @ self.w_proj[e].t() + (0 if self.b_proj is None else self.b_proj[e])


class SwitchFFN(nn.Module):
    def __init__(self, config: PretrainSwitchConfig):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=config.router_bias)
        self.experts = Experts(config)

    def group_size(self, x: torch.Tensor) -> int:
        n, group = x.shape[0] * x.shape[1], self.config.routing_group
        size = {"batch": n, "sequence": x.shape[1]}.get(group, group)
        if n % size:
            raise ValueError(f"routing_group: groups of {size} tokens do not divide the {n} tokens of this call")
        return size

    def kept(self, expert: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Whether each token has a place at its expert: its rank among its group's earlier tokens routed
        to the same expert is below the capacity."""
        cfg, size = self.config, self.group_size(x)
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        capacity = cfg.expert_capacity or math.ceil(size / cfg.num_experts * factor)
        one_hot = F.one_hot(expert, cfg.num_experts).view(-1, size, cfg.num_experts)
        rank = (one_hot.cumsum(dim=1) * one_hot).sum(-1).view(-1) - 1
        return rank < capacity

    def forward(self, x: torch.Tensor, decoding: bool) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        bias = None if self.router.bias is None else self.router.bias.float()
        probs = F.linear(tokens.float(), self.router.weight.float(), bias).softmax(dim=-1)
        gate, expert = probs.max(dim=-1)
        kept = torch.ones_like(expert, dtype=torch.bool) if decoding else self.kept(expert, x)
        out = torch.zeros_like(tokens)
        for e in range(self.config.num_experts):
            rows = ((expert == e) & kept).nonzero().flatten()
            if rows.numel():
                y = self.experts(tokens[rows], e, self.config.activation)
                out[rows] = (y * gate[rows, None]).to(out.dtype)
        return out.view(x.shape)


class Block(nn.Module):
    def __init__(self, config: PretrainSwitchConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = SwitchFFN(config) if (layer + 1) % config.moe_every == 0 else MLP(config)

    def forward(self, x: torch.Tensor, cache: Optional[Cache], decoding: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x), decoding)


class PretrainSwitchForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainSwitchConfig
    base_model_prefix = "transformer"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: PretrainSwitchConfig):
        super().__init__(config)
        d = config.hidden_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, d), wpe=nn.Embedding(config.max_position_embeddings, d),
            h=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            ln_f=nn.LayerNorm(d, eps=config.layer_norm_eps, bias=config.bias)))
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the checkpoint; this only gives freshly built models finite values."""
        if isinstance(module, Experts):
            for p in module.parameters():
                nn.init.normal_(p, std=0.02)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def forward(self, input_ids: torch.Tensor, cache: Optional[Cache] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, past_key_values: Optional[Cache] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """A call with a cache (or use_cache) decodes: input_ids continue the cached tokens, no token is dropped."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding (zeros in attention_mask) is not supported: decode one sequence per call "
                             "or sequences of equal length")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        past = 0 if cache is None else cache.get_seq_length()
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, cache, decoding=cache is not None)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
