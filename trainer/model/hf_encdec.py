"""Weight mapping between our EncoderDecoder and Hugging Face `transformers`: T5ForConditionalGeneration
(T5 v1.0 and v1.1), SwitchTransformersForConditionalGeneration (Switch as published) and MarianMTModel
(the Vaswani Transformer's options).

The config decides the family: relative positions and pre-RMSNorm are T5 (SwitchTransformers with
`moe`); sinusoidal positions with post-LayerNorm are Marian. A config that a family cannot express
exactly is refused, naming each key. Each of our tensors is one or more of Hugging Face's, concatenated
(our fused key-value and gated-GELU projections) or stacked (our experts); HF's tied copies of the
embedding and Marian's fixed buffers are written on export and checked or ignored on import.

Hugging Face's T5 scales the decoder output when `tie_word_embeddings` is set (v1.0), and since
transformers 5 ties the head whenever the checkpoint's lm_head equals its embedding: the config's
flag carries our `scale_decoder_output`, and lm_head.weight is always written.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from trainer.config import ModelConfig
from trainer.model.encdec import EncoderDecoder

Entry = tuple[str, tuple[str, ...], str]  # (our key, HF keys, "cat" | "stack" | "stack_t")


def family(cfg: ModelConfig, any_routing: bool = False) -> str:
    """'t5', 'switch_transformers' or 'marian': the Hugging Face class `cfg` maps to; ValueError naming
    every key it cannot express. any_routing: leave Switch's routing group and capacity unchecked (the
    weights do not depend on them; the exporter's remote-code subclass routes as we do)."""
    if cfg.arch != "encoder_decoder":
        raise ValueError("model.arch: only an encoder_decoder maps to T5, SwitchTransformers or Marian")
    name = "marian" if cfg.pos_embedding == "sinusoidal" else "switch_transformers" if cfg.moe else "t5"
    problems = _marian_problems(cfg) if name == "marian" else _t5_problems(cfg, name, any_routing)
    if problems:
        raise ValueError(f"cannot map to Hugging Face {name}: " + "; ".join(problems))
    return name


def _mismatches(cfg: ModelConfig, name: str, **wanted) -> list[str]:
    return [f"model.{k} is {getattr(cfg, k)!r} ({name} has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]


def _t5_problems(cfg: ModelConfig, name: str, any_routing: bool) -> list[str]:
    problems = _mismatches(cfg, name, pos_embedding="relative", norm="rmsnorm", norm_position="pre", bias=False,
                           attention_scaling=False, scale_embeddings=False)
    if cfg.tie_embeddings and not cfg.scale_decoder_output and name == "switch_transformers":
        problems.append("model.scale_decoder_output is false with tied embeddings "
                        "(SwitchTransformers rescales a tied head)")
    if cfg.moe is not None:
        problems += _switch_problems(cfg, any_routing)
    return problems


def routes_per_sequence(cfg: ModelConfig) -> bool:
    """Whether SwitchTransformers' own router routes as cfg: a fixed capacity per sequence."""
    return cfg.moe.routing_group == "sequence" and cfg.moe.expert_capacity is not None


def _switch_problems(cfg: ModelConfig, any_routing: bool) -> list[str]:
    moe, problems = cfg.moe, []
    if not any_routing and not routes_per_sequence(cfg):
        problems.append("model.moe: SwitchTransformers routes with a fixed expert_capacity per sequence "
                        "(set routing_group: sequence and expert_capacity)")
    if moe.expert_d_ff not in (None, cfg.ff_width):
        problems.append(f"model.moe.expert_d_ff is {moe.expert_d_ff} "
                        f"(SwitchTransformers' experts have d_ff {cfg.ff_width})")
    for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layer)):
        if [cfg.is_moe_layer(i) for i in range(n)] != _hf_sparse_layers(n, _sparse_count(cfg, n)):
            problems.append(f"model.moe.every is {moe.every} (SwitchTransformers cannot place the {stack}'s "
                            f"Switch layers in the same {n} blocks)")
    return problems


def _sparse_count(cfg: ModelConfig, n_layer: int) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(n_layer))


def _hf_sparse_layers(n_layer: int, num_sparse: int) -> list[bool]:
    """SwitchTransformersStack's placement of `num_sparse` Switch layers among `n_layer` blocks."""
    step = n_layer // num_sparse if num_sparse else n_layer
    return [i % step == 1 or step == 1 for i in range(n_layer)]


def _marian_problems(cfg: ModelConfig) -> list[str]:
    problems = _mismatches(cfg, "Marian", sinusoidal_layout="concatenated", norm="layernorm", norm_position="post",
                           bias=True, attention_scaling=True, tie_embeddings=True, scale_decoder_output=False,
                           layer_norm_eps=1e-5, moe=None)
    if cfg.activation == "gated-gelu":
        problems.append("model.activation is 'gated-gelu' (Marian's FFN is not gated)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        problems.append(f"model.d_kv is {cfg.d_kv} (Marian's heads are d_model / n_head wide)")
    return problems


_ACTIVATION = {"relu": "relu", "gelu": "gelu_new", "gated-gelu": "gated-gelu"}  # gelu_new: the tanh GELU


def hf_config(cfg: ModelConfig, eos_token_id: Optional[int] = None, switch_config=None):
    """The `transformers` config of the same shape (same eps, dropout, start and pad token). switch_config:
    a SwitchTransformersConfig subclass that routes by group (the exporter's remote code): any routing,
    expert_capacity 0 where the capacity comes from the factor."""
    import transformers

    name = family(cfg, any_routing=switch_config is not None)
    tokens = dict(decoder_start_token_id=cfg.decoder_start_token_id, pad_token_id=cfg.decoder_start_token_id,
                  **({} if eos_token_id is None else dict(eos_token_id=eos_token_id)))
    if name == "marian":
        return transformers.MarianConfig(
            vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.n_layer, encoder_attention_heads=cfg.n_head, decoder_attention_heads=cfg.n_head,
            encoder_ffn_dim=cfg.ff_width, decoder_ffn_dim=cfg.ff_width, max_position_embeddings=cfg.n_ctx,
            activation_function=_ACTIVATION[cfg.activation], dropout=cfg.dropout, attention_dropout=cfg.dropout,
            activation_dropout=0.0, scale_embedding=cfg.scale_embeddings, share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True, init_std=cfg.init_std, **tokens)
    shape = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.ff_width,
                 num_layers=cfg.encoder_layers, num_decoder_layers=cfg.n_layer, num_heads=cfg.n_head,
                 relative_attention_num_buckets=cfg.relative_buckets,
                 relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=cfg.dropout,
                 layer_norm_epsilon=cfg.layer_norm_eps, tie_word_embeddings=cfg.scale_decoder_output, **tokens)
    if name == "t5":
        return transformers.T5Config(feed_forward_proj=_ACTIVATION[cfg.activation], **shape)
    moe = cfg.moe
    return (switch_config or transformers.SwitchTransformersConfig)(
        num_sparse_encoder_layers=_sparse_count(cfg, cfg.encoder_layers),
        num_sparse_decoder_layers=_sparse_count(cfg, cfg.n_layer), num_experts=moe.num_experts,
        expert_capacity=moe.expert_capacity or 0, router_bias=moe.router_bias, router_jitter_noise=moe.jitter,
        router_dtype="float32", router_z_loss_coef=moe.z_loss_coef, router_aux_loss_coef=moe.aux_loss_coef,
        dense_act_fn=_ACTIVATION[cfg.activation], **shape)


def _linear(ours: str, hf: tuple[str, ...], bias: bool) -> Iterator[Entry]:
    yield f"{ours}.weight", tuple(f"{h}.weight" for h in hf), "cat"
    if bias:
        yield f"{ours}.bias", tuple(f"{h}.bias" for h in hf), "cat"


def _attention(ours: str, hf: str, names: tuple[str, str, str, str], bias: bool) -> Iterator[Entry]:
    q, k, v, o = (f"{hf}.{n}" for n in names)
    yield from _linear(f"{ours}.q_attn", (q,), bias)
    yield from _linear(f"{ours}.c_attn", (k, v), bias)
    yield from _linear(f"{ours}.c_proj", (o,), bias)


def _t5_ffn(cfg: ModelConfig, ours: str, hf: str, layer: int, switch: bool) -> Iterator[Entry]:
    if cfg.is_moe_layer(layer):
        yield from _linear(f"{ours}.router", (f"{hf}.mlp.router.classifier",), cfg.moe.router_bias)
        experts = range(cfg.moe.num_experts)
        yield f"{ours}.experts.w_fc", tuple(f"{hf}.mlp.experts.expert_{e}.wi.weight" for e in experts), "stack_t"
        yield f"{ours}.experts.w_proj", tuple(f"{hf}.mlp.experts.expert_{e}.wo.weight" for e in experts), "stack"
        return
    dense = f"{hf}.{'mlp' if switch else 'DenseReluDense'}"
    wi = (f"{dense}.wi_0", f"{dense}.wi_1") if cfg.activation == "gated-gelu" else (f"{dense}.wi",)
    yield from _linear(f"{ours}.c_fc", wi, False)
    yield from _linear(f"{ours}.c_proj", (f"{dense}.wo",), False)


def _t5_entries(cfg: ModelConfig, switch: bool) -> Iterator[Entry]:
    qkvo = ("q", "k", "v", "o")
    for stack, n_layer in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layer)):
        yield (f"{stack}.relative_bias.table.weight",
               (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), "cat")
        for i in range(n_layer):
            ours, hf = f"{stack}.h.{i}", f"{stack}.block.{i}.layer"
            yield f"{ours}.ln_1.weight", (f"{hf}.0.layer_norm.weight",), "cat"
            yield from _attention(f"{ours}.attn", f"{hf}.0.SelfAttention", qkvo, False)
            ff = 1
            if stack == "decoder":
                yield f"{ours}.ln_cross.weight", (f"{hf}.1.layer_norm.weight",), "cat"
                yield from _attention(f"{ours}.cross_attn", f"{hf}.1.EncDecAttention", qkvo, False)
                ff = 2
            yield f"{ours}.ln_2.weight", (f"{hf}.{ff}.layer_norm.weight",), "cat"
            yield from _t5_ffn(cfg, f"{ours}.mlp", f"{hf}.{ff}", i, switch)
        yield f"{stack}.ln_f.weight", (f"{stack}.final_layer_norm.weight",), "cat"
    yield "wte.weight", ("shared.weight",), "cat"
    yield "lm_head.weight", ("shared.weight" if cfg.tie_embeddings else "lm_head.weight",), "cat"


def _marian_entries(cfg: ModelConfig) -> Iterator[Entry]:
    qkvo = ("q_proj", "k_proj", "v_proj", "out_proj")
    for stack, n_layer in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layer)):
        for i in range(n_layer):
            ours, hf = f"{stack}.h.{i}", f"model.{stack}.layers.{i}"
            yield from _attention(f"{ours}.attn", f"{hf}.self_attn", qkvo, True)
            yield from _linear(f"{ours}.ln_1", (f"{hf}.self_attn_layer_norm",), True)
            if stack == "decoder":
                yield from _attention(f"{ours}.cross_attn", f"{hf}.encoder_attn", qkvo, True)
                yield from _linear(f"{ours}.ln_cross", (f"{hf}.encoder_attn_layer_norm",), True)
            yield from _linear(f"{ours}.mlp.c_fc", (f"{hf}.fc1",), True)
            yield from _linear(f"{ours}.mlp.c_proj", (f"{hf}.fc2",), True)
            yield from _linear(f"{ours}.ln_2", (f"{hf}.final_layer_norm",), True)
    yield "wte.weight", ("model.shared.weight",), "cat"
    yield "lm_head.weight", ("model.shared.weight",), "cat"


def entries(cfg: ModelConfig) -> list[Entry]:
    name = family(cfg, any_routing=True)
    return list(_marian_entries(cfg) if name == "marian" else _t5_entries(cfg, switch=name == "switch_transformers"))


def aliases(cfg: ModelConfig) -> dict[str, str]:
    """HF keys that hold a copy of another HF key (tied embeddings): alias -> source."""
    if family(cfg, any_routing=True) == "marian":
        shared = "model.shared.weight"
        return {f"model.{s}.embed_tokens.weight": shared for s in ("encoder", "decoder")} | {"lm_head.weight": shared}
    tied = {"lm_head.weight": "shared.weight"} if cfg.tie_embeddings else {}
    return {f"{s}.embed_tokens.weight": "shared.weight" for s in ("encoder", "decoder")} | tied


def _fixed_buffers(model: EncoderDecoder) -> dict[str, torch.Tensor]:
    """Marian's non-learned tensors: a zero output bias and the position tables."""
    if family(model.cfg, any_routing=True) != "marian":
        return {}
    table = model.pos_table.detach().contiguous()
    return {"final_logits_bias": table.new_zeros(1, model.cfg.vocab_size),
            "model.encoder.embed_positions.weight": table, "model.decoder.embed_positions.weight": table}


def to_hf_state_dict(model: EncoderDecoder) -> dict[str, torch.Tensor]:
    """Our state dict as the Hugging Face model's state dict (tied copies and fixed buffers included), contiguous."""
    ours, out = model.state_dict(), {}
    for key, hf_keys, how in entries(model.cfg):
        t = ours[key].detach()
        parts = t.chunk(len(hf_keys)) if how == "cat" else [e.t() if how == "stack_t" else e for e in t.unbind(0)]
        out.update({h: p.contiguous() for h, p in zip(hf_keys, parts)})
    out.update({alias: out[source] for alias, source in aliases(model.cfg).items()})
    return out | _fixed_buffers(model)


def load_hf_state_dict(model: EncoderDecoder, hf_sd: dict[str, torch.Tensor]) -> None:
    """Load a Hugging Face state dict into `model`; a missing or unexpected key, a tied copy that differs
    from its source, or a non-zero Marian output bias is an error. Marian's position tables are ignored
    (ours are computed the same way)."""
    cfg, table = model.cfg, entries(model.cfg)
    alias = aliases(cfg)
    needed = {h for _, hf_keys, _ in table for h in hf_keys}
    missing = sorted(needed - set(hf_sd))
    unexpected = sorted(set(hf_sd) - needed - set(alias) - set(_fixed_buffers(model)))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, source in alias.items():
        if key in hf_sd and not torch.equal(hf_sd[key], hf_sd[source]):
            raise ValueError(f"{key} differs from {source}, but model.tie_embeddings is true")
    if "final_logits_bias" in hf_sd and hf_sd["final_logits_bias"].any():
        raise ValueError("final_logits_bias is not zero: our output head has no bias")
    converted = {}
    for key, hf_keys, how in table:
        parts = [hf_sd[h] for h in hf_keys]
        converted[key] = torch.cat(parts) if how == "cat" else torch.stack([p.t() if how == "stack_t" else p
                                                                            for p in parts])
    model.load_state_dict(converted, strict=True)
