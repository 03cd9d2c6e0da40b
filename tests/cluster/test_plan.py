"""The planner: the three recorded cases, the memory model's pieces, and estimate vs a measured run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.cli import main
from cluster.configio import load_model_config
from cluster.plan import GB, Layout, estimate_memory, make_plan
from tests.cluster.conftest import plan_json


def test_gpt3_175b_on_1024_gpus_is_feasible(capsys, repo_root):
    code, plan = plan_json(capsys, str(repo_root / "configs/model/gpt3-175b.yaml"), "--gpus", "1024",
                           "--gpu-memory-gb", "80")
    assert code == 0 and plan["feasible"]
    layout = plan["layout"]
    # 175B x 16 bytes of model states only fit when ZeRO-3 shards the weights too.
    assert layout["zero_stage"] == 3 and layout["activation_checkpointing"]
    assert layout["dp_size"] * layout["micro_batch_size"] * layout["gradient_accumulation_steps"] == \
        plan["global_batch_size"]
    assert plan["memory"]["total"] <= plan["budget_bytes"] <= 80 * GB
    assert plan["step_time_s"] > 0 and "parallel.zero_stage=3" in plan["set"]


def test_switch_c_on_1024_gpus_is_feasible_with_expert_parallelism(capsys, repo_root):
    code, plan = plan_json(capsys, str(repo_root / "configs/model/switch-c-2048.yaml"), "--gpus", "1024",
                           "--gpu-memory-gb", "80")
    assert code == 0 and plan["feasible"]
    layout = plan["layout"]
    assert layout["ep_size"] > 1 and 2048 % layout["ep_size"] == 0 and 1024 % layout["ep_size"] == 0
    assert layout["zero_stage"] < 3  # the engine refuses ZeRO-3 with experts
    assert plan["memory"]["moe_all_to_all"] > 0
    assert plan["memory"]["total"] <= plan["budget_bytes"]


def test_gpt3_175b_on_8_gpus_is_infeasible_with_the_reason(capsys, repo_root):
    code = main(["plan", str(repo_root / "configs/model/gpt3-175b.yaml"), "--gpus", "8", "--gpu-memory-gb", "80"])
    out = capsys.readouterr().out
    assert code == 1
    assert "INFEASIBLE" in out and "does not fit on 8 x 80 GB" in out
    assert "model states" in out and "at least 64 GPUs" in out


def test_a_train_config_supplies_seq_len_batch_and_precision(capsys, repo_root):
    code, plan = plan_json(capsys, str(repo_root / "configs/train/tiny-switch-cpu.yaml"), "--gpus", "2",
                           "--gpu-memory-gb", "16")
    assert code == 0
    assert (plan["seq_len"], plan["global_batch_size"], plan["precision"]) == (64, 16, "fp32")


def test_memory_shrinks_with_each_zero_stage_and_with_checkpointing(repo_root):
    cfg = load_model_config(repo_root / "configs/model/gpt3-1.3b.yaml")
    totals = [estimate_memory(cfg, Layout(z, 1, 64, 1, 1, False), 2048, "bf16").total for z in range(4)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    plain = estimate_memory(cfg, Layout(1, 1, 64, 4, 1, False), 2048, "bf16").activations
    ckpt = estimate_memory(cfg, Layout(1, 1, 64, 4, 1, True), 2048, "bf16").activations
    assert ckpt < plain / 2  # the cross-entropy buffers over the vocabulary are not checkpointed


def test_expert_parallelism_divides_expert_weights(repo_root):
    cfg = load_model_config(repo_root / "configs/model/switch-base-128.yaml")
    one = estimate_memory(cfg, Layout(0, 1, 64, 1, 1, False), 2048, "bf16")
    many = estimate_memory(cfg, Layout(0, 64, 64, 1, 1, False), 2048, "bf16")
    assert many.weights < one.weights / 4 and many.moe_all_to_all > 0 == one.moe_all_to_all


def test_batch_is_rounded_to_the_data_parallel_size_with_a_note(repo_root):
    cfg = load_model_config(repo_root / "configs/model/gpt3-125m.yaml")
    plan = make_plan(cfg, 48, 80, global_batch=250)
    assert plan.global_batch_size == 240 and any("250 -> 240" in n for n in plan.notes)


def test_bad_arguments_are_one_line_errors(capsys, repo_root):
    assert main(["plan", str(repo_root / "configs/model/tiny-gpt.yaml"), "--gpus", "0", "--gpu-memory-gb", "8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_estimate_is_within_15_percent_of_measured_peak_memory_on_cpu(repo_root):
    """Real forward/backward/AdamW steps of the tiny configs in a child process (bench/plan_accuracy.py)."""
    out = subprocess.run([sys.executable, str(repo_root / "bench/plan_accuracy.py"), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=repo_root)
    results = json.loads(out.stdout)
    assert {r["config"] for r in results} == {"configs/train/tiny-gpt-cpu.yaml", "configs/train/tiny-switch-cpu.yaml"}
    for r in results:
        assert abs(r["memory_ratio"] - 1) <= 0.15, r
    assert out.returncode == 0, out.stderr[-2000:]


def test_construction_and_checkpoint_save_peaks_are_counted(repo_root):
    from cluster.plan import INIT_CHUNK
    from trainer.initialize import CHUNK
    from trainer.model.counting import param_counts

    assert INIT_CHUNK == CHUNK
    cfg = load_model_config(repo_root / "configs/model/gpt3-175b.yaml")
    layout = Layout(zero_stage=3, ep_size=1, dp_size=1024, micro_batch_size=1, gradient_accumulation_steps=1,
                    activation_checkpointing=True)
    mem = estimate_memory(cfg, layout, 2048, "bf16")
    # Built partitioned: a 1024th of the bf16 weights, never the whole 350 GB.
    assert mem.construction == param_counts(cfg).total * 2 / 1024 + 4 * INIT_CHUNK
    assert mem.checkpoint_save < mem.step and mem.total == mem.step


def test_t5_base_memory_terms_by_hand(repo_root):
    """T5-Base (vocabulary 50358, dropout 0.1) on 8 GPUs in bf16, ZeRO-1, micro batch 4 of T5's 512 inputs
    and 114 targets: every term written out."""
    from trainer.model.counting import Example, param_counts

    cfg = load_model_config(repo_root / "configs/model/t5-base.yaml")
    n = param_counts(cfg).total
    mem = estimate_memory(cfg, Layout(1, 1, 8, 4, 1, False), Example(512, 114, 568), "bf16")
    assert (mem.weights, mem.grads, mem.optimizer) == (2 * n, 2 * n, 12 * n / 8)
    d, ff, S, T = 768, 3072, 4 * 512, 4 * 114  # 12 heads of 64: attention width = d
    encoder_block = 2 * S * (2 * d + 5 * d + 2 * d + ff) + 2 * S * d  # bf16 saves; ReLU keeps one hidden; masks
    decoder_block = 2 * (T * (2 * d + 5 * d) + T * (2 * d + 3 * d) + S * 2 * d + T * (2 * d + ff)) + 3 * T * d
    final_norms = 2 * 2 * (S + T) * d
    relative_bias = 2 * 12 * (512 ** 2 + 2 * 114 ** 2)
    # The loss a chunk of up to 1024 tokens at a time: their bf16 logits, its float32 copy and logsumexp's
    # temporary; the float32 head-weight gradient and the bf16 hidden states' gradient, made in forward.
    logits = T * 50358 * (2 + 4 + 4) + 4 * 50358 * d + 2 * T * d
    assert mem.activations == 12 * encoder_block + 12 * decoder_block + final_norms + relative_bias + logits
    assert mem.moe_all_to_all == 0 and mem.buffers == 4 * (-(-n // 10 ** 6) * 10 ** 6)


def test_switch_base_128_memory_terms_by_hand(repo_root):
    """Switch-Base-128 on 64 GPUs, experts over 8 (ZeRO-2): expert states split 8 ways then ZeRO over the 8
    ranks holding the same experts; the Switch blocks keep the routed buffers and a float32 router."""
    from trainer.model.counting import Example, param_counts

    cfg = load_model_config(repo_root / "configs/model/switch-t5-base-128.yaml")
    counts = param_counts(cfg)
    dense, expert = counts.total - counts.expert, counts.expert
    mem = estimate_memory(cfg, Layout(2, 8, 64, 4, 1, False), Example(512, 114, 568), "bf16")
    assert mem.weights == 2 * dense + 2 * expert / 8
    assert mem.grads == pytest.approx(2 * dense / 64 + 2 * expert / 8 / 8)
    assert mem.optimizer == pytest.approx(12 * dense / 64 + 12 * expert / 8 / 8)
    d, ff, E, S, T = 768, 3072, 128, 4 * 512, 4 * 114

    def switch_ffn(tokens):  # norm in/out and gathered output, routed slots (input, expert hidden pre/post)
        return 2 * (3 * d * tokens + 1.25 * tokens * (d + 2 * ff)) + 4 * tokens * (2 * E + d)

    encoder = {False: 2 * S * (9 * d + ff), True: 2 * S * 7 * d + switch_ffn(S)}
    decoder_attention = 2 * (T * 7 * d + T * 5 * d + S * 2 * d)
    decoder = {False: decoder_attention + 2 * T * (2 * d + ff), True: decoder_attention + switch_ffn(T)}
    masks = 12 * 2 * S * d + 12 * 3 * T * d
    blocks = 6 * sum(encoder.values()) + 6 * sum(decoder.values()) + masks
    rest = 2 * 2 * (S + T) * d + 2 * 12 * (512 ** 2 + 2 * 114 ** 2) + T * 50358 * 10 + 4 * 50358 * d + 2 * T * d
    assert mem.activations == pytest.approx(blocks + rest)
    assert mem.moe_all_to_all == 2 * 1.25 * S * d * 2  # one Switch layer's tokens out and back, the encoder's


def test_encoder_decoder_plan_counts_raw_tokens(capsys, repo_root):
    """Step time from one example's FLOPs; tokens/s and the default batch in raw tokens, as the trainer logs them."""
    from trainer.model.counting import Example, flops_per_example

    code, plan = plan_json(capsys, str(repo_root / "configs/model/t5-base.yaml"), "--gpus", "8",
                           "--gpu-memory-gb", "80")
    assert code == 0 and plan["feasible"]
    assert (plan["seq_len"], plan["targets_len"], plan["tokens_per_sequence"]) == (512, 114, 568)
    assert plan["global_batch_size"] == 880  # GPT-3's 0.5M-token batch at this size: 0.5M / 568
    cfg = load_model_config(repo_root / "configs/model/t5-base.yaml")
    flops = flops_per_example(cfg, Example(512, 114, 568)) * 880
    assert plan["flops_per_step"] == flops
    assert plan["compute_time_s"] == pytest.approx(flops / (8 * 312e12 * 0.4))
    # 8 GPUs share one node's NVLink; ZeRO-1/2's reductions are not overlapped, so they add to compute.
    assert plan["step_time_s"] == pytest.approx(plan["compute_time_s"] + plan["comm_time_s"])
    assert plan["tokens_per_s"] == pytest.approx(880 * 568 / plan["step_time_s"])
    assert main(["plan", str(repo_root / "configs/train/tiny-switch-t5-cpu.yaml"), "--gpus", "2",
                 "--gpu-memory-gb", "16"]) == 0
    assert "inputs 64, targets 14 from 70 raw tokens" in capsys.readouterr().out


def test_switch_c_encoder_decoder_needs_expert_parallelism(capsys, repo_root):
    code, plan = plan_json(capsys, str(repo_root / "configs/model/switch-t5-c-2048.yaml"), "--gpus", "1024",
                           "--gpu-memory-gb", "80")
    assert code == 0 and plan["feasible"]
    # 1571B parameters: bf16 weights alone are 3.1 TB, so the experts must be split over many ranks.
    assert plan["layout"]["ep_size"] >= 64 and plan["memory"]["total"] <= plan["budget_bytes"]


def test_chunked_loss_lowers_the_estimate_by_the_logits_it_no_longer_holds(repo_root):
    """GPT-3 Small, micro batch 2 x 2048 in fp32: the full path holds 4096 tokens' logits and three float32
    buffers of that size; the chunked one a chunk's logits and two float32 buffers of that size, plus
    the float32 head-weight gradient and the hidden states' gradient."""
    cfg = load_model_config(repo_root / "configs/model/gpt3-125m.yaml")
    layout = Layout(0, 1, 1, 2, 1, False)
    chunked = estimate_memory(cfg, layout, 2048, "fp32").activations
    full = estimate_memory(cfg.model_copy(update={"loss_chunk_tokens": 0}), layout, 2048, "fp32").activations
    V, d, N = 50257, 768, 4096
    assert full - chunked == N * V * 16 - (1024 * V * 8 + 4 * V * d + 4 * N * d)
