"""The models: GPT-2/3 (dense or GPT-3's alternating banded attention) and Switch top-1 MoE FFNs.

Imported lazily so `trainer.model.counting` (pure arithmetic) doesn't pay for importing torch."""
import importlib

_EXPORTS = {"GPT": "gpt", "GPTOutput": "gpt", "MoEStats": "moe", "SwitchFFN": "moe"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.model.{_EXPORTS[name]}"), name)
