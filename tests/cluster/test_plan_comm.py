"""The planner's communication model (cluster/comm.py): volumes and calls by hand, presets and overrides, and
the layout chosen by estimated step time."""
from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.cli import main
from cluster.comm import PRESETS, collectives, estimate
from cluster.configio import load_model_config
from cluster.plan import make_plan
from tests.cluster.conftest import plan_json
from trainer.model.counting import Example, param_counts


def test_gpt3_175b_zero3_moves_about_a_terabyte_per_gpu_per_step(capsys, repo_root):
    code, plan = plan_json(capsys, str(repo_root / "configs/model/gpt3-175b.yaml"), "--gpus", "1024",
                           "--gpu-memory-gb", "80")
    assert code == 0 and plan["layout"]["zero_stage"] == 3
    psi = param_counts(load_model_config(repo_root / "configs/model/gpt3-175b.yaml")).total
    accum = plan["layout"]["gradient_accumulation_steps"]
    ring = 1023 / 1024 * psi * 2 * accum  # bf16 weights and gradients, once per micro-batch each
    volume = plan["comm_bytes_per_gpu_by_kind"]
    assert volume == pytest.approx({"zero3_forward_gather": ring, "zero3_backward_gather": ring,
                                    "grad_reduce_scatter": ring})
    assert sum(volume.values()) > 1e12  # across nodes, at the A100 preset's 25 GB/s of InfiniBand per GPU
    # A gather per fetch: the embeddings, then each block (the prefetch bucket, 12 d^2); the gradients fill
    # 12 d^2-element buckets, the blocks' norms and biases one more. 60 us per call.
    assert plan["comm_calls_by_kind"] == {"zero3_forward_gather": 97 * accum, "zero3_backward_gather": 97 * accum,
                                          "grad_reduce_scatter": 98 * accum}
    assert plan["comm_s_by_kind"]["zero3_forward_gather"] == pytest.approx(ring / 25e9 + 97 * accum * 60e-6)
    assert plan["compute_time_s"] > 0 and plan["bound"] in ("compute", "communication")
    assert plan["step_time_s"] >= plan["compute_time_s"]


def test_without_overlap_the_planner_chooses_hpz_to_keep_backward_gathers_on_nvlink(capsys, repo_root):
    # 96 GB: room for hpz's secondary copy at the micro batch plain ZeRO-3 runs (on 80 GB, hpz would need
    # micro batch 1, twice the gathers, and plain ZeRO-3 is faster)
    code, plan = plan_json(capsys, str(repo_root / "configs/model/gpt3-175b.yaml"), "--gpus", "1024",
                           "--gpu-memory-gb", "96", "--comm-overlap", "0")
    assert code == 0 and plan["layout"]["zero_hpz_partition_size"] == 8
    psi = param_counts(load_model_config(repo_root / "configs/model/gpt3-175b.yaml")).total
    assert plan["layout"]["gradient_accumulation_steps"] == 1
    assert plan["comm_s_by_kind"]["zero3_backward_gather"] == pytest.approx(7 / 8 * psi * 2 / 300e9 + 97 * 30e-6)
    assert plan["memory"]["hpz_secondary"] == psi * 2 / 8  # the 16-bit weights split over one node
    assert plan["step_time_s"] == pytest.approx(plan["compute_time_s"] + plan["comm_time_s"])
    assert "parallel.zero_hpz_partition_size=8" in plan["set"]
    assert "ZeRO-3 without hpz fits but its fastest step is" in plan["reason"]


def test_zero2_reduces_every_micro_batch_zero1_once_per_step(repo_root):
    cfg = load_model_config(repo_root / "configs/model/gpt3-1.3b.yaml")
    ex = Example(2048, 2048, 2048)

    def reduce_bytes(stage: int) -> float:
        colls = collectives(cfg, stage, 64, 1, 1, 4, ex, "bf16", 8)
        return sum(c.bytes_per_gpu() for c in colls if c.kind == "grad_reduce")

    all_reduce = 2 * 63 / 64 * param_counts(cfg).total * 2
    assert reduce_bytes(0) == pytest.approx(all_reduce) == pytest.approx(reduce_bytes(1))
    assert reduce_bytes(2) == pytest.approx(4 * all_reduce)


def test_expert_all_to_all_is_four_per_moe_layer_per_micro_batch_and_one_of_the_counts(repo_root):
    cfg = load_model_config(repo_root / "configs/model/switch-base-128.yaml")
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
    ex = Example(2048, 2048, 2048)
    colls = [c for c in collectives(cfg, 1, 64, 8, 2, 3, ex, "bf16", 8) if c.kind == "all_to_all"]
    slots = cfg.moe.capacity_factor * 2 * 2048 * cfg.d_model * 2  # micro batch 2, bf16
    counts = 128 * 8  # int64 tokens per expert
    volume = moe_layers * 3 * 7 / 8 * (4 * slots + counts)
    assert sum(c.bytes_per_gpu() for c in colls) == pytest.approx(volume)
    assert all(c.intra_node for c in colls)  # 8 consecutive ranks: one node
    est = estimate(colls, 1.0, PRESETS["a100-80gb"], 1.0)
    assert est.calls["all_to_all"] == moe_layers * 3 * 5
    assert est.seconds["all_to_all"] == pytest.approx(volume / 300e9 + moe_layers * 3 * 5 * 30e-6)
    assert est.step_s == pytest.approx(1.0 + est.seconds["all_to_all"])  # exposed: experts wait for tokens


def test_latency_adds_calls_times_the_per_call_latency(repo_root):
    cfg = load_model_config(repo_root / "configs/model/gpt3-1.3b.yaml")
    colls = [c for c in collectives(cfg, 2, 64, 1, 1, 4, Example(2048, 2048, 2048), "bf16", 8)
             if c.kind == "grad_reduce"]
    # 1.3B gradients in DeepSpeed's 5e8-element buckets: two full and the rest, per micro-batch, 4 micro-batches
    assert [(c.calls, c.buckets, c.buffer_bytes) for c in colls] == [(4, 2, 2 * 5e8 * 2),
                                                                      (4, 1, (param_counts(cfg).total - 1e9) * 2)]
    volume = 4 * 2 * 63 / 64 * param_counts(cfg).total * 2
    hw = PRESETS["a100-80gb"]
    for latency_us in (60.0, 1000.0):
        est = estimate(colls, 1.0, replace(hw, ib_latency_us=latency_us), 1.0)  # 64 GPUs: 8 nodes, InfiniBand
        assert est.calls["grad_reduce"] == 12
        assert est.seconds["grad_reduce"] == pytest.approx(volume / 25e9 + 12 * latency_us * 1e-6, rel=1e-12)


def test_many_small_zero3_fetches_are_latency_bound(repo_root):
    # 48 narrow blocks and a small vocabulary: each fetch gathers one block of 49k parameters
    cfg = load_model_config(repo_root / "configs/model/tiny-gpt.yaml").model_copy(
        update={"vocab_size": 256, "n_layer": 48})
    colls = collectives(cfg, 3, 16, 1, 1, 1, Example(256, 256, 256), "bf16", 8)
    gathers = [c for c in colls if c.kind == "zero3_forward_gather"]
    assert [c.buckets for c in gathers] == [1, 48]  # the embeddings, then one fetch per block
    volume = sum(c.bytes_per_gpu() for c in gathers)
    assert volume == 15 / 16 * param_counts(cfg).total * 2
    est = estimate(colls, 1e-3, PRESETS["a100-80gb"], 1.0)
    assert est.seconds["zero3_forward_gather"] == pytest.approx(49 * 60e-6 + volume / 25e9)
    assert 49 * 60e-6 > 10 * volume / 25e9
    assert est.bound == "communication"
    no_latency = estimate(colls, 1e-3, replace(PRESETS["a100-80gb"], ib_latency_us=1e-9), 1.0)
    assert no_latency.bound == "compute"


def test_one_call_per_bucket_group_and_fetch(repo_root):
    cfg = load_model_config(repo_root / "configs/model/tiny-gpt.yaml")  # 3.3M parameters, 3.2M of them embeddings
    ex = Example(64, 64, 64)

    def calls(stage: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in collectives(cfg, stage, 2, 1, 1, 2, ex, "fp32", 8):
            out[c.kind] = out.get(c.kind, 0) + c.calls * c.buckets
        return out

    assert calls(1) == {"grad_reduce": 1, "param_gather": 2}  # one bucket; embeddings, and the decayed matrices
    assert calls(2) == {"grad_reduce": 2, "param_gather": 2}
    # ZeRO-3's bucket is the token table: per micro-batch, a fetch of the embeddings and one of both blocks, and
    # reduce-scatters of the token table, the position table and the blocks (no backward gather: two modules)
    assert calls(3) == {"zero3_forward_gather": 4, "grad_reduce_scatter": 6}


def test_a_slow_network_makes_the_step_communication_bound(repo_root):
    cfg = load_model_config(repo_root / "configs/model/gpt3-1.3b.yaml")
    fast = make_plan(cfg, 64, 80)
    slow = make_plan(cfg, 64, 80, hw=PRESETS["a100-80gb"].__class__(**{**PRESETS["a100-80gb"].__dict__,
                                                                      "ib_gbps": 0.1}))
    assert fast.bound == "compute" and slow.bound == "communication"
    assert slow.step_time_s > fast.step_time_s and slow.comm_time_s > slow.compute_time_s


def test_hardware_presets_and_overrides_from_flags_and_config(capsys, repo_root, tmp_path):
    code, plan = plan_json(capsys, str(repo_root / "configs/model/gpt3-1.3b.yaml"), "--gpus", "64",
                           "--hardware", "h200")
    assert code == 0 and plan["gpu_memory_gb"] == 141 and plan["gpu_tflops"] == 989
    assert plan["hardware"]["ib_gbps"] == 50
    train = tmp_path / "train.yaml"
    train.write_text((repo_root / "configs/train/tiny-gpt-cpu.yaml").read_text().replace(
        "model: ../model/tiny-gpt.yaml", f"model: {repo_root}/configs/model/tiny-gpt.yaml")
        + "cluster:\n  hardware: h100\n  ib_gbps: 12.5\n  gpus_per_node: 4\n  ib_latency_us: 5\n")
    code, plan = plan_json(capsys, str(train), "--gpus", "8", "--nvlink-gbps", "100", "--nvlink-latency-us", "7")
    assert code == 0 and (plan["hardware"]["name"], plan["hardware"]["ib_gbps"], plan["hardware"]["gpus_per_node"],
                          plan["hardware"]["nvlink_gbps"], plan["gpu_memory_gb"]) == ("h100", 12.5, 4, 100, 80)
    assert (plan["hardware"]["nvlink_latency_us"], plan["hardware"]["ib_latency_us"]) == (7, 5)


def test_unknown_preset_and_bad_figures_are_one_line_errors(capsys, repo_root):
    model = str(repo_root / "configs/model/tiny-gpt.yaml")
    assert main(["plan", model, "--gpus", "8", "--hardware", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hardware" in err and "a100-80gb" in err
    assert main(["plan", model, "--gpus", "8", "--ib-gbps", "-1"]) == 2
    assert "--ib-gbps" in capsys.readouterr().err
    assert main(["plan", model, "--gpus", "8", "--ib-latency-us", "0"]) == 2
    assert "--ib-latency-us" in capsys.readouterr().err
    assert main(["plan", model, "--gpus", "8", "--comm-overlap", "2"]) == 2
    assert "--comm-overlap" in capsys.readouterr().err


def test_text_output_names_compute_communication_and_the_bound(capsys, repo_root):
    assert main(["plan", str(repo_root / "configs/model/gpt3-175b.yaml"), "--gpus", "1024",
                 "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "-bound" in out and "compute " in out and "zero3 forward gather" in out and "InfiniBand 25 GB/s" in out
    assert "GB per GPU in 97 calls" in out and "60 us per call" in out
    assert "the fastest estimated step of the" in out
