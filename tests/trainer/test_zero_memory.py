"""ZeRO model-state memory per GPU from the config alone, as the planner and `pretrain model info` use it."""
from __future__ import annotations

from trainer.config import ModelConfig, MoEConfig
from trainer.model.counting import param_counts
from trainer.zero_memory import memory_per_gpu


def test_memory_follows_zero_stages():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=100)
    p = param_counts(cfg).total
    stages = [memory_per_gpu(cfg, stage, dp_size=4) for stage in range(4)]
    assert (stages[0].weights, stages[0].grads, stages[0].optimizer) == (2 * p, 2 * p, 12 * p)
    assert stages[1].optimizer == 3 * p and stages[1].grads == 2 * p
    assert stages[2].grads == p / 2 and stages[2].weights == 2 * p
    assert stages[3].weights == p / 2 and stages[3].total == 4 * p
    fp32 = memory_per_gpu(cfg, 0, dp_size=1, precision="fp32")
    assert fp32.total == 16 * p


def test_memory_shards_experts_over_expert_parallel_ranks():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=100, moe=MoEConfig(num_experts=8, every=1))
    counts = param_counts(cfg)
    dense = counts.total - counts.expert
    est = memory_per_gpu(cfg, zero_stage=1, dp_size=8, ep_size=4)
    assert est.weights == 2 * (dense + counts.expert / 4)
    assert est.optimizer == 12 * (dense / 8 + counts.expert / 4 / 2)
    # 6 ranks do not split into expert-parallel groups of 4: the config type refuses that layout.
    assert cfg.expert_parallel_error(4, 6) == "4 does not divide the data-parallel size 6"
