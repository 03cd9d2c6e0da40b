"""`pretrain scale`: every shipped config keeps its family at CPU size, and each one, scaled to cpu,
trains 3 steps with the real trainer CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.configio import load_model_config, load_run_config
from cluster.scale import scale_config
from tests.trainer.conftest import encoding, shard_dir  # noqa: F401  (the trainer's shard fixtures)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(REPO.glob("configs/model/*.yaml")) + sorted(REPO.glob("configs/train/*.yaml"))


def family(cfg) -> tuple:
    moe = cfg.moe
    options = cfg.model_dump(include={"arch", "sinusoidal_layout", "relative_buckets", "relative_max_distance",
                                      "attention_scaling", "norm", "norm_position", "activation", "tie_embeddings",
                                      "scale_embeddings", "scale_decoder_output", "decoder_start_token_id", "init",
                                      "dropout", "layer_norm_eps"})
    return (options, cfg.attention, cfg.pos_embedding, cfg.bias, cfg.vocab_size, round(cfg.ff_width / cfg.d_model, 1),
            None if moe is None else (moe.every, moe.capacity_factor, moe.eval_capacity_factor, moe.jitter,
                                      moe.aux_loss_coef, moe.z_loss_coef, moe.expert_init_scale))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("target", ["cpu", "single-gpu"])
def test_scaled_config_keeps_the_family(path, target):
    original = load_model_config(path)
    scaled = scale_config(path, target)
    assert family(scaled.model) == family(original)
    kinds = {(scaled.model.is_moe_layer(i), i % 2 if scaled.model.attention == "alternating" else 0)
             for i in range(scaled.model.n_layer)}
    expected = {(original.is_moe_layer(i), i % 2 if original.attention == "alternating" else 0)
                for i in range(original.n_layer)}
    assert kinds == expected  # every kind of block survives (dense/banded, dense/MoE FFN)
    assert scaled.model.n_ctx >= scaled.train.seq_len
    if scaled.model.attention == "alternating":
        assert scaled.model.local_window < scaled.train.seq_len  # the band still bands
    if target == "cpu":
        assert scaled.model.d_model <= 64 and scaled.train.precision == "fp32"


def test_scale_writes_a_loadable_train_config(tmp_path, capsys):
    out = tmp_path / "scaled.yaml"
    assert main(["scale", str(REPO / "configs/model/switch-c-2048.yaml"), "--target", "cpu", "--out",
                 str(out)]) == 0
    run = load_run_config(out)
    assert run.model.moe.every == 1 and run.model.moe.num_experts == 4 and run.model.name == "switch-c-2048-cpu"


@pytest.mark.parametrize("name,stacks", [("t5-large", (2, 2)), ("switch-t5-c-2048", (2, 2)),
                                          ("transformer-big", (2, 2))])
def test_encoder_decoder_scales_both_stacks_and_keeps_its_objective(name, stacks):
    run = scale_config(REPO / "configs/model" / f"{name}.yaml", "cpu")
    assert (run.model.encoder_layers, run.model.n_layer) == stacks
    assert run.model.head_dim * run.model.n_head == run.model.d_model == 64
    assert run.train.objective == "span_corruption" and run.train.tokens_per_sequence == 70  # 64 inputs
    asymmetric = scale_config(REPO / "configs/model/t5-base.yaml", "single-gpu", ["n_encoder_layer=24"])
    assert (asymmetric.model.encoder_layers, asymmetric.model.n_layer) == (16, 8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5-base", "switch-t5-base-128"])
def test_scaled_encoder_decoder_trains(tmp_path, shard_dir, name):
    """`pretrain scale` of a T5 and a Switch model gives a run config the trainer runs: 3 steps, loss logged."""
    from tests.trainer.conftest import train_in_process

    run = scale_config(REPO / "configs/model" / f"{name}.yaml", "cpu")
    run.data.path, run.train.max_steps, run.logging.wandb_mode = str(shard_dir), 3, "disabled"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False))
    assert train_in_process(run_dir) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] > 0 for m in metrics)
    assert ("aux_loss" in metrics[-1]) == (run.model.moe is not None)


def distinct_scaled_configs(tmp_path: Path, data_dir: Path) -> dict[str, Path]:
    """One file per distinct scaled config: the GPT-3 sizes all scale to the same tiny model, and
    training the same model with the same settings twice would test nothing more."""
    by_content: dict[str, Path] = {}
    for path in SHIPPED:
        run = scale_config(path, "cpu")
        run.data.path = str(data_dir)
        run.train.max_steps = 3
        run.logging.wandb_mode = "disabled"
        # What decides the training: model (its name aside), train and parallel sections.
        text = yaml.safe_dump(run.model_dump(mode="json", include={"model", "train", "parallel"},
                                             exclude={"model": {"name"}}), sort_keys=True)
        if text not in by_content:
            target = tmp_path / f"{path.stem}-cpu.yaml"
            target.write_text(yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False))
            by_content[text] = target
    return {p.stem: p for p in by_content.values()}


@pytest.mark.slow
def test_every_shipped_config_scaled_to_cpu_trains_3_steps(data_job, tmp_path):
    assert data_job.state == "SUCCEEDED", data_job.printed[-3000:]
    configs = distinct_scaled_configs(tmp_path, data_job.output_dir)
    kinds = {(m.attention, m.moe.every if m.moe else None)
             for m in (load_run_config(c).model for c in configs.values())}
    assert {("alternating", None), ("dense", 2), ("dense", 1)} <= kinds  # GPT-3, Switch, Switch-C
    # Two single-threaded runs at a time: the 2-core budget, spent on training rather than start-up.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pending = list(configs.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        runs = {name: _start_training(config, tmp_path / "runs" / name, env) for name, config in batch}
        for name, proc in runs.items():
            run_dir = tmp_path / "runs" / name
            assert proc.wait(timeout=300) == 0, f"{name}:\n{(run_dir.parent / f'{name}.log').read_text()[-3000:]}"
            steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert steps[-1] == 3, name


def _start_training(config: Path, run_dir: Path, env: dict) -> subprocess.Popen:
    """`pretrain train` in the background, its output in a log file beside the run dir."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(config), "--run-dir", str(run_dir)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
