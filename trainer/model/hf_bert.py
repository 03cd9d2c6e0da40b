"""Weight mapping between our BERT and Hugging Face `transformers` BertForPreTraining.

Key for key, except that our key-value projection (c_attn) is HF's key and value concatenated. HF keeps
tied copies: the MLM output matrix (`cls.predictions.decoder.weight`) is the word embedding and its bias
(`cls.predictions.decoder.bias`) is `cls.predictions.bias`; they are written on export and checked on
import. A config BertForPreTraining cannot express exactly is refused, naming each key.
"""
from __future__ import annotations

from typing import Iterator

import torch

from trainer.config import ModelConfig
from trainer.model.bert import BERT
from trainer.special_tokens import PAD

Entry = tuple[str, tuple[str, ...]]  # (our key, the HF keys concatenated into it)
_ACTIVATION = {"gelu-exact": "gelu", "gelu": "gelu_new"}  # HF's "gelu" is the erf one, "gelu_new" the tanh one
ALIASES = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
           "cls.predictions.decoder.bias": "cls.predictions.bias"}


def check_hf_compatible(cfg: ModelConfig) -> None:
    problems = []
    if cfg.arch != "encoder":
        problems.append(f"model.arch is {cfg.arch!r} (BERT is arch encoder)")
    for key, bert_value in dict(norm="layernorm", bias=True, attention_scaling=True).items():
        if getattr(cfg, key) != bert_value:
            problems.append(f"model.{key} is {getattr(cfg, key)!r} (BERT has {bert_value!r})")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        problems.append(f"model.d_kv is {cfg.d_kv} (BERT's heads are d_model / n_head wide)")
    if problems:
        raise ValueError("cannot map to Hugging Face BERT: " + "; ".join(problems))


def hf_config(cfg: ModelConfig):
    """A `transformers.BertConfig` of the same shape (same GELU, eps, dropout and init; [PAD] our PAD)."""
    from transformers import BertConfig

    check_hf_compatible(cfg)
    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.ff_width, hidden_act=_ACTIVATION[cfg.activation],
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.n_ctx, type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=PAD if PAD < cfg.vocab_size else 0,
        tie_word_embeddings=True)


def _linear(ours: str, *hf: str) -> Iterator[Entry]:
    for leaf in ("weight", "bias"):
        yield f"{ours}.{leaf}", tuple(f"{h}.{leaf}" for h in hf)


def entries(cfg: ModelConfig) -> list[Entry]:
    check_hf_compatible(cfg)
    out = [("transformer.wte.weight", ("bert.embeddings.word_embeddings.weight",)),
           ("transformer.wpe.weight", ("bert.embeddings.position_embeddings.weight",)),
           ("transformer.wtt.weight", ("bert.embeddings.token_type_embeddings.weight",)),
           *_linear("transformer.ln_e", "bert.embeddings.LayerNorm")]
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}", f"bert.encoder.layer.{i}"
        out += [*_linear(f"{ours}.attn.q_attn", f"{hf}.attention.self.query"),
                *_linear(f"{ours}.attn.c_attn", f"{hf}.attention.self.key", f"{hf}.attention.self.value"),
                *_linear(f"{ours}.attn.c_proj", f"{hf}.attention.output.dense"),
                *_linear(f"{ours}.ln_1", f"{hf}.attention.output.LayerNorm"),
                *_linear(f"{ours}.mlp.c_fc", f"{hf}.intermediate.dense"),
                *_linear(f"{ours}.mlp.c_proj", f"{hf}.output.dense"),
                *_linear(f"{ours}.ln_2", f"{hf}.output.LayerNorm")]
    return out + [*_linear("mlm.dense", "cls.predictions.transform.dense"),
                  *_linear("mlm.ln", "cls.predictions.transform.LayerNorm"),
                  ("lm_head.weight", ("bert.embeddings.word_embeddings.weight",)),  # tied: the same tensor
                  ("lm_head.bias", ("cls.predictions.bias",)),
                  *_linear("pooler", "bert.pooler.dense"),
                  *_linear("nsp_head", "cls.seq_relationship")]


def to_hf_state_dict(model: BERT) -> dict[str, torch.Tensor]:
    """Our state dict as BertForPreTraining's (its tied copies included), contiguous."""
    ours, out = model.state_dict(), {}
    for key, hf_keys in entries(model.cfg):
        out.update({h: part.detach().contiguous() for h, part in zip(hf_keys, ours[key].chunk(len(hf_keys)))})
    return out | {alias: out[source] for alias, source in ALIASES.items()}


def load_hf_state_dict(model: BERT, hf_sd: dict[str, torch.Tensor]) -> None:
    """Load a BertForPreTraining state dict into `model`; a missing or unexpected key, or a tied copy that
    differs from its source, is an error."""
    table = entries(model.cfg)
    needed = {h for _, hf_keys in table for h in hf_keys}
    missing = sorted(needed - set(hf_sd))
    unexpected = sorted(set(hf_sd) - needed - set(ALIASES) - {"bert.embeddings.position_ids"})
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for alias, source in ALIASES.items():
        if alias in hf_sd and not torch.equal(hf_sd[alias], hf_sd[source]):
            raise ValueError(f"{alias} differs from {source}: our MLM output matrix is the token table")
    model.load_state_dict({key: torch.cat([hf_sd[h] for h in hf_keys]) for key, hf_keys in table}, strict=True)
