"""`pretrain model info`: analytic parameter counts against the GPT-3 paper, FLOPs and the ZeRO
memory table, through the real CLI entry point."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Brown et al. 2020, Table 2.1.
GPT3_PARAMS = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9,
               "6.7b": 6.7e9, "13b": 13.0e9, "175b": 175.0e9}


def info(capsys, *args: str) -> dict:
    assert main(["model", "info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size,paper", GPT3_PARAMS.items())
def test_gpt3_parameter_counts_match_the_paper(capsys, size, paper):
    out = info(capsys, str(CONFIGS / "model" / f"gpt3-{size}.yaml"))
    assert abs(out["params_total"] - paper) / paper < 0.02
    assert out["params_active"] == out["params_total"]
    assert out["params_non_embedding"] < out["params_total"]


def test_flops_per_token_is_six_n_plus_attention(capsys):
    out = info(capsys, str(CONFIGS / "model" / "gpt3-175b.yaml"))
    six_n = 6 * out["params_non_embedding"]
    # The attention term and the LM head add a few percent at 175B, never less than 6N.
    assert six_n < out["flops_per_token"] < 1.1 * six_n


def test_switch_active_params_are_a_fraction_of_total(capsys):
    out = info(capsys, str(CONFIGS / "model" / "switch-c-2048.yaml"))
    # The decoder-only Switch-C holds half of the paper's 1571B encoder-decoder's experts.
    assert 0.7e12 < out["params_total"] < 0.85e12
    assert out["params_active"] < out["params_total"] / 500
    assert out["params_expert"] > 0.99 * out["params_total"]


@pytest.mark.parametrize("name,paper,active", [("t5-base", 220e6, 220e6), ("switch-t5-base-8", None, 223e6),
                                               ("switch-t5-c-2048", 1571e9, 1.73e9)])
def test_encoder_decoder_counts_at_the_papers_vocabulary(capsys, name, paper, active):
    out = info(capsys, str(CONFIGS / "model" / f"{name}.yaml"), "--set", "vocab_size=32128",
               "--set", "decoder_start_token_id=0")
    if paper:
        assert abs(out["params_total"] - paper) / paper < 0.02
    assert abs(out["params_active"] - active) / active < 0.02
    assert (out["arch"], out["n_encoder_layer"]) == ("encoder_decoder", out["n_layer"])


def test_encoder_decoder_info_shows_stacks_experts_and_the_example(capsys):
    out = info(capsys, str(CONFIGS / "model" / "switch-t5-base-128.yaml"))
    assert (out["n_encoder_layer"], out["n_layer"], out["num_experts"], out["moe_layers"]) == (12, 12, 128, 12)
    # T5's span corruption at n_ctx 512: 568 raw tokens make 512 inputs and 114 targets; FLOPs per raw token.
    assert (out["seq_len"], out["targets_len"], out["tokens_per_sequence"]) == (512, 114, 568)
    assert out["flops_per_token"] == pytest.approx(out["flops_per_sequence"] / 568)
    assert main(["model", "info", str(CONFIGS / "model" / "switch-t5-base-128.yaml")]) == 0
    text = capsys.readouterr().out
    assert "12 encoder + 12 decoder" in text and "128 in each of 12 Switch layers" in text
    assert "inputs 512, targets 114 (568 raw tokens)" in text


def test_a_train_config_supplies_the_objective(capsys):
    out = info(capsys, str(CONFIGS / "train" / "tiny-t5-cpu.yaml"))
    assert (out["seq_len"], out["targets_len"], out["tokens_per_sequence"]) == (64, 14, 70)


def test_zero_stages_shrink_memory_per_gpu(capsys):
    out = info(capsys, str(CONFIGS / "model" / "gpt3-13b.yaml"), "--dp", "64")
    mem = out["memory_per_gpu_bytes"]
    totals = [mem[f"zero{s}"]["total"] for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    # Mixed-precision Adam: 16 bytes per parameter unpartitioned, all of it split over dp at ZeRO-3.
    assert totals[0] == pytest.approx(16 * out["params_total"], rel=1e-6)
    assert totals[3] == pytest.approx(16 * out["params_total"] / 64, rel=1e-6)


def test_info_accepts_a_train_config(capsys, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {CONFIGS / 'model' / 'tiny-gpt.yaml'}\ndata: {{path: x}}\ntrain: {{seq_len: 64}}\n")
    assert info(capsys, str(run))["name"] == "tiny-gpt"


def test_info_refuses_a_train_config_with_an_unknown_key(capsys, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {CONFIGS / 'model' / 'tiny-gpt.yaml'}\ndata: {{path: x}}\ntrain: {{seq_len: 64}}\n"
                   "optimiser: {lr: 1}\n")
    assert main(["model", "info", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run}: optimiser: unknown key"


def test_table_output_mentions_every_stage(capsys):
    assert main(["model", "info", str(CONFIGS / "model" / "gpt3-125m.yaml")]) == 0
    text = capsys.readouterr().out
    assert "125" in text and "ZeRO stage" in text


def test_missing_config_is_one_line_error(capsys, tmp_path):
    assert main(["model", "info", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.yaml" in err and "\n" not in err
