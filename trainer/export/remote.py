"""Our Switch models as the remote-code classes written beside their weights: the decoder-only GPT as
PretrainSwitchForCausalLM (modeling_pretrain_switch.py; the config carries our model config's fields and
the weights keep our names, a sinusoidal table becoming the position table), and an encoder-decoder whose
routing SwitchTransformers cannot hold as PretrainSwitchTransformersForConditionalGeneration
(modeling_pretrain_switch_transformers.py: the library's model and weight layout, our router). Each class is
registered, so save_pretrained writes config.json with its auto_map and copies the modeling file."""
from __future__ import annotations

from torch import nn

from trainer.export import modeling_pretrain_switch as decoder_remote
from trainer.export import with_weights
from trainer.export import modeling_pretrain_switch_transformers as encdec_remote
from trainer.model.encdec import EncoderDecoder
from trainer.model.gpt import GPT


def remote_config(model: GPT, eos: int) -> decoder_remote.PretrainSwitchConfig:
    cfg, moe = model.cfg, model.cfg.moe
    return decoder_remote.PretrainSwitchConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.n_ctx, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, hidden_size=cfg.d_model, head_dim=cfg.head_dim, d_ff=cfg.ff_width,
        expert_d_ff=cfg.expert_ff_width, activation=cfg.activation, bias=cfg.bias, layer_norm_eps=cfg.layer_norm_eps,
        attention=cfg.attention, local_window=cfg.local_window, num_experts=moe.num_experts, moe_every=moe.every,
        routing_group=moe.routing_group, capacity_factor=moe.capacity_factor,
        eval_capacity_factor=moe.eval_capacity_factor, expert_capacity=moe.expert_capacity,
        router_bias=moe.router_bias, initializer_range=cfg.init_std, bos_token_id=eos, eos_token_id=eos)


def remote_switch_model(model: GPT, eos: int) -> nn.Module:
    """The decoder-only remote-code model holding our weights."""
    from transformers import GenerationConfig

    decoder_remote.PretrainSwitchConfig.register_for_auto_class()
    decoder_remote.PretrainSwitchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    weights = {k: v.detach().float() for k, v in model.state_dict().items()}
    if "transformer.wpe.weight" not in weights:
        weights["transformer.wpe.weight"] = model.pos_table
    hf = with_weights(decoder_remote.PretrainSwitchForCausalLM(remote_config(model, eos)), weights)
    # A plain forward routes as our eval forward (config.use_cache off); generate passes a cache and decodes.
    hf.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, use_cache=True)
    return hf


def remote_switch_transformers_model(model: EncoderDecoder, eos: int) -> nn.Module:
    """The SwitchTransformers subclass with our routing, holding our weights in the library's layout."""
    from trainer.model import hf_encdec

    encdec_remote.PretrainSwitchTransformersConfig.register_for_auto_class()
    encdec_remote.PretrainSwitchTransformersForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
    config = hf_encdec.hf_config(model.cfg, eos, switch_config=encdec_remote.PretrainSwitchTransformersConfig)
    moe = model.cfg.moe
    config.routing_group, config.fixed_capacity = moe.routing_group, moe.expert_capacity
    config.capacity_factor, config.eval_capacity_factor = moe.capacity_factor, moe.eval_capacity_factor
    return with_weights(encdec_remote.PretrainSwitchTransformersForConditionalGeneration(config),
                        hf_encdec.to_hf_state_dict(model))
