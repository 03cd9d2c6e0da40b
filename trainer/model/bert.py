"""BERT (Devlin et al. 2018): a bidirectional Transformer encoder pre-trained by masked language modelling
and next-sentence prediction (trainer/masked_lm.py makes the examples).

Token, learned position and token type (segment A or B) embeddings, summed and LayerNorm'd; post-LayerNorm
blocks with GELU (encdec.py's Block without cross-attention, on GPT's attention and MLP); an MLM head
(dense, GELU, LayerNorm, then the token table as output matrix, plus a bias) and an NSP head (the pooler,
dense + tanh of the first ([CLS]) position, then a two-way classifier). Padding is kept out of attention
by the attention mask. Written for one device, like gpt.py.

model(ids, token_types, attention_mask, next_sentence, targets): with targets (-1 where nothing is
predicted) the MLM head runs at the predicted positions only, as BERT gathers them (15% of the
positions), so `logits` are (N, V) for the N predicted positions in order; without, (B, T, V).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.model.encdec import Block, make_norm
from trainer.model.gpt import GELU_APPROXIMATE, GPTOutput, InitByRule, residual_init_std


@dataclass
class BERTOutput(GPTOutput):
    """GPTOutput with ce_loss the MLM loss and loss = MLM + NSP loss (no MoE: aux and z losses are 0)."""
    nsp_logits: Optional[torch.Tensor] = None  # (B, 2): IsNext (0), NotNext (1)
    nsp_loss: Optional[torch.Tensor] = None


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, 1, 1, T) scores bias, -inf at the keys the mask leaves out; None when it leaves none out
    (SDPA keeps its fastest kernel without a mask)."""
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    return bias[:, None, None, :]


class BERT(InitByRule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        lm_head = nn.Linear(d, cfg.vocab_size, bias=cfg.bias)
        # Tied: the token table is the MLM output matrix, so its own is never allocated.
        embeddings = dict(wte=nn.Embedding(cfg.vocab_size, d, device="meta"))
        embeddings["wte"].weight = lm_head.weight
        self.transformer = nn.ModuleDict(dict(
            **embeddings,
            wpe=nn.Embedding(cfg.n_ctx, d),
            wtt=nn.Embedding(cfg.type_vocab_size, d),
            ln_e=make_norm(cfg),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i, decoder=False, moe_layer_id=i) for i in range(cfg.n_layer)),
        ))
        self.mlm = nn.ModuleDict(dict(dense=nn.Linear(d, d, bias=cfg.bias), ln=make_norm(cfg)))
        self.lm_head = lm_head
        self.pooler = nn.Linear(d, d, bias=cfg.bias)
        self.nsp_head = nn.Linear(d, 2, bias=cfg.bias)
        self.reset_parameters()

    def init_rule(self, name: str) -> tuple[float, float]:
        """(mean, std) parameter `name` starts from: norm weights 1, biases 0, every matrix and table
        N(0, init_std) (BERT's, `init: bert`), residual projections / sqrt(2 n_layer) with `init: gpt2`."""
        module_name, _, leaf = name.rpartition(".")
        if isinstance(self.get_submodule(module_name), (nn.LayerNorm, nn.RMSNorm)):
            return (1.0 if leaf == "weight" else 0.0), 0.0
        if leaf == "bias":
            return 0.0, 0.0
        if self.cfg.init == "gpt2" and name.endswith("c_proj.weight"):
            return 0.0, residual_init_std(self.cfg)
        return 0.0, self.cfg.init_std

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, in order: what activation checkpointing wraps."""
        return list(self.transformer.h)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied output matrix counts once); non_embedding leaves out the token,
        position and token type tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.transformer[k].weight.numel() for k in ("wte", "wpe", "wtt"))
        return n

    def embed(self, idx: torch.Tensor, token_types: Optional[torch.Tensor]) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the position table n_ctx={self.cfg.n_ctx}")
        t = self.transformer
        types = token_types if token_types is not None else torch.zeros_like(idx)
        x = t.wte(idx) + t.wtt(types) + t.wpe(torch.arange(T, device=idx.device))
        return t.drop(t.ln_e(x))

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.mlm.dense(h), approximate=GELU_APPROXIMATE[self.cfg.activation])
        return self.lm_head(self.mlm.ln(h))

    def forward(self, idx: torch.Tensor, token_types: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, next_sentence: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> BERTOutput:
        """idx, token_types, attention_mask (False or 0 at padding) and targets (B, T); next_sentence (B,)."""
        x = self.embed(idx, token_types)
        bias = None if attention_mask is None else padding_bias(attention_mask, x.dtype)
        for block in self.transformer.h:
            x, _ = block(x, bias)
        nsp_logits = self.nsp_head(torch.tanh(self.pooler(x[:, 0])))
        zero = x.new_zeros((), dtype=torch.float32)
        nsp_loss = None if next_sentence is None else F.cross_entropy(nsp_logits.float(), next_sentence)
        if targets is None:
            return BERTOutput(logits=self.mlm_logits(x), loss=nsp_loss, ce_loss=None, aux_loss=zero, z_loss=zero,
                              nsp_logits=nsp_logits, nsp_loss=nsp_loss)
        predicted = targets != -1
        logits = self.mlm_logits(x[predicted])
        # Cross-entropy in float32 even when the model runs in 16 bits.
        mlm_loss = F.cross_entropy(logits.float(), targets[predicted])
        loss = mlm_loss if nsp_loss is None else mlm_loss + nsp_loss
        return BERTOutput(logits=logits, loss=loss, ce_loss=mlm_loss, aux_loss=zero, z_loss=zero,
                          nsp_logits=nsp_logits, nsp_loss=nsp_loss)
