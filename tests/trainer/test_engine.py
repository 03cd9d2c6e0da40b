import math

import pytest
import yaml

from tests.trainer.conftest import REPO, free_port, make_run, read_metrics, run_training, train_in_process
from trainer import weight_shards
from trainer.config import ModelConfig
from trainer.engine import param_groups
from trainer.errors import TrainError

TINY_EXPERTS = yaml.safe_load((REPO / "configs/model/tiny-switch.yaml").read_text())["moe"]["num_experts"]


def test_param_groups_decay_matrices_only_and_isolate_experts(repo_root):
    from trainer.expert_parallel import apply_expert_parallel
    from trainer.model.gpt import GPT

    cfg = ModelConfig(**yaml.safe_load((repo_root / "configs/model/tiny-switch.yaml").read_text()))
    model = GPT(cfg)
    apply_expert_parallel(model, ep_size=1)  # marks the experts, as build_engine does
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {(g["name"], g.get("moe", False)): [names[id(p)] for p in g["params"]] for g in groups}
    dense_decay = by_group[("decay", False)]
    assert all(n.endswith("weight") and "ln" not in n and "wte" not in n and "wpe" not in n for n in dense_decay)
    no_decay = by_group[("no_decay", False)]
    assert "transformer.wte.weight" in no_decay and any(n.endswith("bias") for n in no_decay)
    experts = [n for (name, moe), ns in by_group.items() if moe for n in ns]
    assert experts and all(n.rsplit(".", 1)[-1] in ("w_fc", "b_fc", "w_proj", "b_proj") for n in experts)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_tiny_gpt_loss_falls_by_a_clear_margin(tmp_path, shard_dir):
    run = make_run(tmp_path / "run", shard_dir, train={"max_steps": 60, "seq_len": 32, "micro_batch_size": 4,
                                                       "global_batch_size": 4, "lr": 5e-3, "warmup_tokens": 640})
    assert train_in_process(run) == 0
    m = read_metrics(run)
    first = m[1]["loss"]
    last = sum(m[s]["loss"] for s in range(51, 61)) / 10
    assert first > 10.5  # ln(50257) = 10.8: an untrained model
    assert last < first - 2.5, (first, last)  # 7.7k tokens: most of the way to this text's unigram entropy


@pytest.mark.parametrize("zero", [0, 1])
def test_switch_in_one_process(tmp_path, shard_dir, zero):
    run = make_run(tmp_path / "run", shard_dir, model="tiny-switch", parallel={"zero_stage": zero},
                   train={"max_steps": 4}, checkpoint={"interval": 2})
    assert train_in_process(run) == 0
    m = read_metrics(run)
    assert m[4]["loss"] < m[1]["loss"] and len(m[4]["expert_load"][0]) == TINY_EXPERTS
    assert (run / "checkpoints" / "step-4" / "weights-rank0.safetensors").is_file()


def test_zero3_with_experts_is_refused_with_a_reason(tmp_path, shard_dir):
    run = make_run(tmp_path / "run", shard_dir, model="tiny-switch", parallel={"zero_stage": 3})
    with pytest.raises(TrainError, match="ZeRO-3 with a MoE model is not supported"):
        train_in_process(run)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("model,zero,ep", [("tiny-gpt", 1, 1), ("tiny-gpt", 2, 1), ("tiny-gpt", 3, 1),
                                           ("tiny-switch", 1, 2)])
def test_two_processes_train_and_checkpoint(tmp_path, shard_dir, model, zero, ep):
    """Loss falls, MoE statistics are logged, and the final checkpoint holds every expert, each rank's part in its own file."""
    run = make_run(tmp_path / "run", shard_dir, model=model, parallel={"zero_stage": zero, "ep_size": ep},
                   train={"max_steps": 8, "global_batch_size": 8}, checkpoint={"interval": 4})
    proc = run_training(run, nproc=2, port=free_port())
    m = read_metrics(run)
    assert m[8]["loss"] < m[1]["loss"] - 0.5
    # MFU is over both ranks' peaks, measured at once (each rank's alone would double it)
    assert "sum over 2 ranks, each measured by a matmul" in proc.stderr
    assert all(0 < r["mfu"] < 1 for r in m.values())
    assert all(m[s]["grad_norm"] is not None for s in (1, 8))
    step = run / "checkpoints" / "step-8"
    assert (step / "COMPLETE").is_file() and (run / "checkpoints" / "latest").read_text() == "step-8"
    if model == "tiny-switch":
        assert {"aux_loss", "z_loss", "dropped_frac", "expert_load"} <= set(m[8])
        assert len(m[8]["expert_load"]) == 1 and len(m[8]["expert_load"][0]) == TINY_EXPERTS
    assert sorted(p.name for p in step.glob("weights-rank*.safetensors")) == [
        "weights-rank0.safetensors", "weights-rank1.safetensors"]
    weights = weight_shards.ShardedWeights(step)
    written = [sum(n for pieces in weights.pieces.values() for _, n, r in pieces if r == rank) for rank in (0, 1)]
    total = sum(math.prod(shape) for shape in weights.shapes.values())
    assert sum(written) == total and max(written) < 0.6 * total  # each rank writes its own part, never the whole
    if model == "tiny-switch":  # each expert-parallel rank writes its own half of the experts
        assert sorted((start, r) for start, _, r in weights.pieces["transformer.h.1.mlp.experts.w_fc"]) == [
            (0, 0), (weights.pieces["transformer.h.1.mlp.experts.w_fc"][0][1], 1)]
