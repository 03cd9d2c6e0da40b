"""A Switch Transformer encoder-decoder exported by `pretrain export hf`, routed as it was trained:
`AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)`. This file imports torch and
transformers only; the exporter copies it next to the weights.

transformers' SwitchTransformersForConditionalGeneration gives each sequence a fixed `expert_capacity`.
The paper (and this checkpoint) computes capacity per routing group: `routing_group` 'batch' (all tokens of
the call), 'sequence', or N consecutive tokens; capacity is `fixed_capacity` when set, else ceil(group tokens
/ experts x (eval_)capacity_factor). This subclass swaps only the router for one that routes so: within a
group, the tokens routed to an expert take its places in token order and the rest are dropped. Decoding
with a cache (as `generate` does) drops no decoder token: a capacity would make a token's output depend on
the tokens decoded with it. Everything else (weights, attention, the experts) is the library's model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.models.switch_transformers.modeling_switch_transformers import (SwitchTransformersSparseMLP,
                                                                                  SwitchTransformersTop1Router)


class PretrainSwitchTransformersConfig(SwitchTransformersConfig):
    """SwitchTransformersConfig plus routing_group, capacity_factor, eval_capacity_factor and fixed_capacity
    (None: from the factor); its own model_type, so the library's class never loads these weights."""

    model_type = "pretrain_switch_transformers"


class GroupRouter(SwitchTransformersTop1Router):
    def __init__(self, config: PretrainSwitchTransformersConfig):
        super().__init__(config)
        self.routing_group, self.fixed_capacity = config.routing_group, config.fixed_capacity
        self.capacity_factor, self.eval_capacity_factor = config.capacity_factor, config.eval_capacity_factor
        self.decoding = False  # set by the model for each call

    def kept(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(B, S, E) one-hot choices -> (B, S, E), true at a token's expert when it has a place there."""
        B, S, E = one_hot.shape
        size = {"batch": B * S, "sequence": S}.get(self.routing_group, self.routing_group)
        if (B * S) % size:
            raise ValueError(f"routing_group: groups of {size} tokens do not divide the {B * S} tokens of this call")
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = self.fixed_capacity or math.ceil(size / E * factor)
        return one_hot.reshape(-1, size, E).cumsum(dim=1).reshape(B, S, E) <= capacity

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As the library's router (float32, jitter in training only), with capacity per routing group."""
        self.input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.dtype)
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise,
                                                                                      1.0 + self.jitter_noise)
        self.classifier = self.classifier.to(self.dtype)
        router_logits = self.classifier(hidden_states)
        router_probs = F.softmax(router_logits, dim=-1, dtype=self.dtype).to(self.input_dtype)
        one_hot = F.one_hot(router_probs.argmax(dim=-1), num_classes=self.num_experts)
        expert_index = one_hot if self.decoding else one_hot * self.kept(one_hot)
        return expert_index, router_probs.max(dim=-1).values.unsqueeze(-1), router_logits


class PretrainSwitchTransformersForConditionalGeneration(SwitchTransformersForConditionalGeneration):
    config_class = PretrainSwitchTransformersConfig

    def __init__(self, config: PretrainSwitchTransformersConfig):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, SwitchTransformersSparseMLP):
                module.router = GroupRouter(config)  # the same parameter names: router.classifier

    def forward(self, *args, **kwargs):
        """A call with a cache (generate's) decodes: the decoder's routers keep every token."""
        decoding = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        for module in self.decoder.modules():
            if isinstance(module, GroupRouter):
                module.decoding = decoding
        return super().forward(*args, **kwargs)
