"""Our GPT as Hugging Face `transformers` GPTNeoForCausalLM: GPT-3's alternating dense and locally banded
attention (GPT-Neo's `attention_types` global/local with `window_size` = local_window: both let a query see
itself and the window - 1 tokens before it), and the dense models GPT-2 cannot hold (no biases, a
sinusoidal position table, written as GPT-Neo's learned table, or ReLU).

GPT-Neo differs from us in two ways that the weights absorb exactly:
- it does not divide attention scores by sqrt(head_dim): the query projection is scaled instead;
- its query, key and value projections have no biases. A key bias adds q.b_k to every score of a query,
  which softmax ignores; a value bias adds b_v to every head's output (the weights sum to 1), so it moves
  into the output projection's bias as W_o b_v. A query bias adds b_q.k_j, which depends on the key: it
  is folded into the query weights through the LayerNorm before them. Its output h = g * xhat + beta has
  sum(xhat) = 0, so u = c / g with c = 1 / sum(beta / g) gives u.h = 1 for every token, and
  (W_q + b_q u^T) h = W_q h + b_q. A model whose query bias is non-zero while sum(beta / g) is zero
  (or some g is) has no such u and is refused.
"""
from __future__ import annotations

import torch

from trainer.config import ModelConfig
from trainer.model.gpt import GPT

_ACTIVATION = {"gelu": "gelu_new", "relu": "relu"}  # gelu_new: the tanh GELU


def check_neo_compatible(cfg: ModelConfig) -> None:
    problems = []
    if cfg.arch != "decoder":
        problems.append(f"model.arch is '{cfg.arch}' (GPT-Neo is a decoder)")
    if cfg.moe is not None:
        problems.append("model.moe is set (GPT-Neo has no MoE layers)")
    if cfg.activation not in _ACTIVATION:
        problems.append(f"model.activation is '{cfg.activation}' (GPT-Neo's MLP is not gated)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        problems.append(f"model.d_kv is {cfg.d_kv} (GPT-Neo's heads are d_model / n_head wide)")
    if problems:
        raise ValueError("cannot map to Hugging Face GPT-Neo: " + "; ".join(problems))


def attention_types(cfg: ModelConfig) -> list:
    """GPT-Neo's run-length form of the layer pattern: even layers global, odd ones local when alternating."""
    if cfg.attention == "dense":
        return [[["global"], cfg.n_layer]]
    pattern = [[["global", "local"], cfg.n_layer // 2]]
    return pattern + ([[["global"], 1]] if cfg.n_layer % 2 else [])


def hf_config(cfg: ModelConfig, eos_token_id: int):
    from transformers import GPTNeoConfig

    check_neo_compatible(cfg)
    return GPTNeoConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.n_ctx, hidden_size=cfg.d_model,
        num_layers=cfg.n_layer, attention_types=attention_types(cfg), num_heads=cfg.n_head,
        intermediate_size=cfg.ff_width, window_size=cfg.local_window, activation_function=_ACTIVATION[cfg.activation],
        resid_dropout=cfg.dropout, embed_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=True,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id)


def _query_bias_direction(ln: torch.nn.LayerNorm, layer: int) -> torch.Tensor:
    """u with u.h = 1 for every output h of `ln` (module docstring)."""
    g = ln.weight.detach().double()
    beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros_like(g)
    total = (beta / g).sum() if bool((g != 0).all()) else torch.tensor(0.0)
    if total.abs() < 1e-6:
        raise ValueError(f"cannot map to Hugging Face GPT-Neo: block {layer} has a query bias, and its ln_1 "
                         "gives no input direction that is constant over tokens to carry it (sum(bias / weight) is 0)")
    return 1.0 / (g * total)


def _attention(model: GPT, i: int) -> dict[str, torch.Tensor]:
    cfg, block = model.cfg, model.transformer.h[i]
    w_q, w_k, w_v = block.attn.c_attn.weight.detach().double().split(cfg.d_model)
    w_o = block.attn.c_proj.weight.detach().double()
    b_o = block.attn.c_proj.bias.detach().double() if cfg.bias else torch.zeros(cfg.d_model, dtype=torch.float64)
    if cfg.bias:
        b_q, _, b_v = block.attn.c_attn.bias.detach().double().split(cfg.d_model)  # the key bias drops out
        if b_q.any():
            w_q = w_q + torch.outer(b_q, _query_bias_direction(block.ln_1, i))
        b_o = b_o + w_o @ b_v
    prefix = f"transformer.h.{i}.attn.attention"
    return {f"{prefix}.q_proj.weight": w_q * cfg.head_dim ** -0.5, f"{prefix}.k_proj.weight": w_k,
            f"{prefix}.v_proj.weight": w_v, f"{prefix}.out_proj.weight": w_o, f"{prefix}.out_proj.bias": b_o}


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights as GPTNeoForCausalLM's state dict (float32, contiguous; zeros for biases we lack)."""
    cfg = model.cfg
    check_neo_compatible(cfg)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {k: v for k, v in ours.items() if ".attn." not in k}  # embeddings, norms, MLPs: the same names
    if cfg.pos_embedding != "learned":
        out["transformer.wpe.weight"] = model.pos_table.detach()
    for i in range(cfg.n_layer):
        out.update(_attention(model, i))
    if not cfg.bias:  # GPT-Neo's norms and MLPs always have biases
        for i in range(cfg.n_layer):
            for name, width in (("ln_1", cfg.d_model), ("ln_2", cfg.d_model), ("mlp.c_fc", cfg.ff_width),
                                ("mlp.c_proj", cfg.d_model)):
                out[f"transformer.h.{i}.{name}.bias"] = torch.zeros(width)
        out["transformer.ln_f.bias"] = torch.zeros(cfg.d_model)
    return {k: v.float().contiguous() for k, v in out.items()}
