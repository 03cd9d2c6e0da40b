"""Weight mapping between our GPT and Hugging Face `transformers` GPT2LMHeadModel.

Our modules carry GPT-2's names, so a state dict maps key for key; the only change is that
GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear. Dense models with
learned positions and biases only: HF GPT-2 has no banded attention, sinusoidal table or MoE.
"""
from __future__ import annotations

import torch

from trainer.config import ModelConfig
from trainer.model.gpt import GPT

# Conv1D weights in HF GPT-2, stored transposed relative to our nn.Linear.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def check_hf_compatible(cfg: ModelConfig) -> None:
    problems = []
    if cfg.arch != "decoder":
        problems.append("model.arch is 'encoder_decoder' (see trainer/model/hf_encdec.py)")
    if cfg.activation != "gelu":
        problems.append(f"model.activation is '{cfg.activation}' (GPT-2's MLP uses the tanh GELU)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        problems.append(f"model.d_kv is {cfg.d_kv} (GPT-2's heads are d_model / n_head wide)")
    if cfg.moe is not None:
        problems.append("model.moe is set (MoE layers have no GPT-2 counterpart)")
    if cfg.attention != "dense":
        problems.append(f"model.attention is '{cfg.attention}' (GPT-2 has only dense attention)")
    if cfg.pos_embedding != "learned":
        problems.append(f"model.pos_embedding is '{cfg.pos_embedding}' (GPT-2 learns its positions)")
    if not cfg.bias:
        problems.append("model.bias is false (GPT-2 always has biases)")
    if problems:
        raise ValueError("cannot map to Hugging Face GPT-2: " + "; ".join(problems))


def hf_config(cfg: ModelConfig):
    """A `transformers.GPT2Config` of the same shape (tanh GELU, same eps, dropout and init)."""
    from transformers import GPT2Config

    check_hf_compatible(cfg)
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.ff_width, activation_function="gelu_new",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=True,
        # GPT-2's end-of-text token is the last id of its vocabulary.
        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
    )


def _is_conv1d(key: str) -> bool:
    return key.endswith(_CONV1D_SUFFIXES)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's layout (weights transposed for Conv1D, contiguous)."""
    check_hf_compatible(model.cfg)
    return {k: (v.t() if _is_conv1d(k) else v).detach().contiguous() for k, v in model.state_dict().items()}


def load_hf_state_dict(model: GPT, hf_sd: dict[str, torch.Tensor]) -> None:
    """Load a GPT2LMHeadModel state dict into `model`; strict: a missing or unexpected key is an error.

    HF's non-parameter buffers (old versions' `attn.bias` masks) are ignored, and a missing
    `lm_head.weight` (saved files often drop the tied copy) is taken from the token embedding.
    """
    check_hf_compatible(model.cfg)
    ours = model.state_dict()
    sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    unexpected = sorted(set(sd) - set(ours))
    missing = sorted(set(ours) - set(sd))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    converted = {k: (v.t() if _is_conv1d(k) else v) for k, v in sd.items()}
    model.load_state_dict(converted, strict=True)
