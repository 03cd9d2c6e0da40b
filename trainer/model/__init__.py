"""The models: GPT-2/3 (dense or GPT-3's alternating banded attention) and Switch top-1 MoE FFNs."""
from trainer.model.gpt import GPT, GPTOutput
from trainer.model.moe import MoEStats, SwitchFFN

__all__ = ["GPT", "GPTOutput", "MoEStats", "SwitchFFN"]
