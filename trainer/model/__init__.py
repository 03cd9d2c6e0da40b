"""The models: GPT-2/3 (dense or GPT-3's alternating banded attention), the encoder-decoder family
(Vaswani Transformer, T5, Switch as published), BERT, and Switch top-1 MoE FFNs.

Imported lazily so `trainer.model.counting` (pure arithmetic) doesn't pay for importing torch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from trainer.config import ModelConfig

_EXPORTS = {"GPT": "gpt", "GPTOutput": "gpt", "EncoderDecoder": "encdec", "BERT": "bert", "BERTOutput": "bert",
            "MoEStats": "moe", "SwitchFFN": "moe"}
_MODEL_OF_ARCH = {"decoder": "GPT", "encoder_decoder": "EncoderDecoder", "encoder": "BERT"}
__all__ = [*_EXPORTS, "model_for"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.model.{_EXPORTS[name]}"), name)


def model_for(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes, built on the current default device: GPT, EncoderDecoder for
    `arch: encoder_decoder`, BERT for `arch: encoder`."""
    return __getattr__(_MODEL_OF_ARCH[cfg.arch])(cfg)
