"""GPT-2/3 decoder (Radford et al. 2019, Brown et al. 2020), optionally with Switch MoE FFNs.

Token embedding + learned (or sinusoidal) positions, pre-LayerNorm blocks, a final
LayerNorm and an LM head tied to the token embedding. GPT-3's alternating attention
(`attention: alternating`) makes the odd layers locally banded. MoE configs replace every
`moe.every`-th FFN with a top-1 Switch layer. Written for one device: the engine applies
ZeRO and expert parallelism from outside. model(idx, cache=model.new_cache()) decodes: each call's
tokens continue the cached ones (trainer/sample.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.model.attention import Attention, KVCache, LayerCache
from trainer.model.loss import LMHead
from trainer.model.moe import MoEStats, SwitchFFN, draw_


@dataclass
class GPTOutput:
    logits: Optional[torch.Tensor]  # (B, T, V); None when training's loss was chunked (lm_output)
    loss: Optional[torch.Tensor]  # ce + aux_loss_coef * aux_loss + z_loss_coef * z_loss (ce alone for dense)
    ce_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor  # mean over MoE layers of the load-balancing loss, unscaled (0 for dense)
    z_loss: torch.Tensor  # mean over MoE layers of the router z-loss, unscaled (0 for dense)
    moe: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in layer order


def sinusoidal_positions(n_ctx: int, d_model: int, layout: str = "interleaved") -> torch.Tensor:
    """(n_ctx, d_model) table of Vaswani et al. 2017: sin(pos / 10000^(2i/d)) and cos of the same angle,
    interleaved (the paper's channels 2i, 2i+1) or concatenated (all sines, then all cosines: tensor2tensor,
    Marian). Computed in float64 so long positions keep float32 precision."""
    position = torch.arange(n_ctx, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    angle = position * inv_freq
    sin, cos = torch.sin(angle), torch.cos(angle[:, : d_model // 2])
    if layout == "concatenated":
        return torch.cat([sin, cos], dim=1).float()
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = sin, cos
    return table.float()


# torch's `approximate` for each GELU: GPT-2's tanh "gelu_new" (keeps its checkpoints bit-compatible), BERT's erf.
GELU_APPROXIMATE = {"gelu": "tanh", "gelu-exact": "none"}


class MLP(nn.Module):
    """GELU (GPT-2; BERT's exact one), ReLU (Vaswani, T5 v1.0) or gated GELU (T5 v1.1: c_fc holds the gate's
    and the linear half's weights, in that order)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        fc_width = 2 * cfg.ff_width if cfg.activation == "gated-gelu" else cfg.ff_width
        self.c_fc = nn.Linear(cfg.d_model, fc_width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ff_width, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "relu":
            return self.c_proj(F.relu(h))
        if self.activation == "gated-gelu":
            gate, linear = h.chunk(2, dim=-1)
            return self.c_proj(F.gelu(gate, approximate="tanh") * linear)
        return self.c_proj(F.gelu(h, approximate=GELU_APPROXIMATE[self.activation]))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        banded = cfg.attention == "alternating" and layer % 2 == 1
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg, window=cfg.local_window if banded else None)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = SwitchFFN(cfg.d_model, cfg.expert_ff_width, cfg.moe, layer=layer, bias=cfg.bias,
                                 activation=cfg.activation, init_std=cfg.init_std,
                                 out_init_std=residual_init_std(cfg))
        else:
            self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[LayerCache] = None) -> tuple[torch.Tensor, Optional[MoEStats]]:
        x = x + self.drop(self.attn(self.ln_1(x), cache=cache))
        h = self.ln_2(x)
        h, stats = self.mlp(h, decoding=cache is not None) if self.is_moe else (self.mlp(h), None)
        return x + self.drop(h), stats


def residual_init_std(cfg: ModelConfig) -> float:
    """GPT-2: projections into the residual stream are scaled by 1/sqrt(2 * n_layer)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)


class InitByRule(nn.Module):
    """What the engine asks of every family's model (engine.build_model, trainer/initialize.py): each
    parameter's `init_rule(name)` -> (mean, std), and buffers rebuilt from the config."""

    cfg: ModelConfig

    def init_rule(self, name: str) -> tuple[float, float]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Every parameter from its init_rule, drawn with torch's RNG. Training runs draw the same rule
        layout-invariantly instead (trainer/initialize.py)."""
        for name, p in self.named_parameters():
            draw_(p, *self.init_rule(name))

    def init_buffers(self) -> None:
        """Tables rebuilt from the config (never saved); again after construction on the meta device."""
        if self.cfg.pos_embedding == "sinusoidal":
            table = sinusoidal_positions(self.cfg.n_ctx, self.cfg.d_model, self.cfg.sinusoidal_layout)
            self.pos_table = table.to(self.pos_table.device)


class GPT(InitByRule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss_chunk_tokens)
        # Tied input/output embeddings: the table is the LM head's weight, so its own is never allocated.
        embeddings = dict(wte=nn.Embedding(cfg.vocab_size, cfg.d_model, device="meta"))
        embeddings["wte"].weight = lm_head.weight
        if cfg.pos_embedding == "learned":
            embeddings["wpe"] = nn.Embedding(cfg.n_ctx, cfg.d_model)
        else:  # fixed table: a non-persistent buffer, so no parameters and nothing in checkpoints
            self.register_buffer("pos_table", torch.empty(cfg.n_ctx, cfg.d_model), persistent=False)
        self.transformer = nn.ModuleDict(dict(
            **embeddings,
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        self.lm_head = lm_head
        self.reset_parameters()
        self.init_buffers()

    def init_rule(self, name: str) -> tuple[float, float]:
        """(mean, std) parameter `name` starts from, GPT-2's scheme: N(0, init_std) for embeddings and
        matrices, init_std / sqrt(2 n_layer) for projections into the residual stream; biases 0, norm
        weights 1; a Switch layer's own rule for its router and experts."""
        if name.startswith("transformer.h.") and ".mlp." in name:
            block = self.transformer.h[int(name.split(".")[2])]
            if block.is_moe:
                return block.mlp.init_rule(name.split(".mlp.", 1)[1])
        module_name, _, leaf = name.rpartition(".")
        if isinstance(self.get_submodule(module_name), nn.LayerNorm):
            return (1.0 if leaf == "weight" else 0.0), 0.0
        if leaf == "bias":
            return 0.0, 0.0
        return 0.0, residual_init_std(self.cfg) if name.endswith("c_proj.weight") else self.cfg.init_std

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, in order: what activation checkpointing wraps."""
        return list(self.transformer.h)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied head counts once); non_embedding leaves out token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
        return n

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def embed(self, idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Token plus position embeddings of idx, whose first token is at position `past`."""
        end = past + idx.shape[1]
        if end > self.cfg.n_ctx:
            raise ValueError(f"sequence length {end} exceeds the position table n_ctx={self.cfg.n_ctx}")
        pos = torch.arange(past, end, device=idx.device)
        pos_emb = self.transformer.wpe(pos) if "wpe" in self.transformer else self.pos_table[past:end]
        return self.transformer.drop(self.transformer.wte(idx) + pos_emb)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> GPTOutput:
        """idx (B, T); targets (B, T), -1 where there is none; cache: decoding (idx follows the cached
        tokens, and its keys and values join them)."""
        x = self.embed(idx, 0 if cache is None else len(cache))
        moe_stats = []
        for i, block in enumerate(self.transformer.h):
            x, stats = block(x, None if cache is None else cache.self_attn[i])
            if stats is not None:
                moe_stats.append(stats)
        return lm_output(self.cfg, self.lm_head, self.transformer.ln_f(x), targets, moe_stats)


def lm_output(cfg: ModelConfig, head: LMHead, hidden: torch.Tensor, targets: Optional[torch.Tensor],
              moe_stats: list[MoEStats]) -> GPTOutput:
    """Logits of the final hidden states, and with targets the loss: cross-entropy plus the MoE layers'
    mean aux and z losses, scaled. Training (targets, gradients on, cfg.loss_chunk_tokens > 0) takes the
    cross-entropy a chunk at a time and returns no logits; eval and decoding get them all."""
    zero = hidden.new_zeros((), dtype=torch.float32)
    aux_loss = torch.stack([s.aux_loss for s in moe_stats]).mean() if moe_stats else zero
    z_loss = torch.stack([s.z_loss for s in moe_stats]).mean() if moe_stats else zero
    chunked = targets is not None and torch.is_grad_enabled() and cfg.loss_chunk_tokens > 0
    logits = None if chunked else head(hidden)
    loss = ce_loss = None
    if targets is not None:
        # Cross-entropy in float32 even under bf16 autocast; -1 marks positions without a target.
        ce_loss = head(hidden, targets) if chunked else F.cross_entropy(
            logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        loss = ce_loss
        if moe_stats:
            loss = ce_loss + cfg.moe.aux_loss_coef * aux_loss + cfg.moe.z_loss_coef * z_loss
    return GPTOutput(logits=logits, loss=loss, ce_loss=ce_loss, aux_loss=aux_loss, z_loss=z_loss, moe=moe_stats)
