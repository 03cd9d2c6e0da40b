import time

import torch
import yaml

from tests.trainer.conftest import FAKE_WANDB_KEY, make_run, read_metrics
from tests.trainer.wandb_records import history
from trainer.config import RunConfig
from trainer.metrics import (MetricsLogger, device_peak, gpu_datasheet_peak, measure_cpu_peak, moe_fields,
                             progress_line)

DESIGN_KEYS = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}


def test_metrics_jsonl_has_the_design_keys(dense_run):
    m = read_metrics(dense_run)
    assert sorted(m) == list(range(1, 31))
    for r in m.values():
        assert DESIGN_KEYS <= set(r) and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert m[30]["tokens"] == 30 * 4 * 32
    # Sources share the tokens by their mixture weights (books 0.7, wiki 0.3), to within one window.
    by_source = m[30]["tokens_by_source"]
    assert sum(by_source.values()) == m[30]["tokens"]
    assert abs(by_source["books"] / m[30]["tokens"] - 0.7) <= 1 / (30 * 4)


def test_wandb_is_offline_in_the_run_dir_and_never_holds_the_key(dense_run):
    assert list((dense_run / "wandb").glob("offline-run-*"))
    for path in dense_run.rglob("*"):
        if path.is_file():
            assert FAKE_WANDB_KEY.encode() not in path.read_bytes(), path


def test_moe_fields_are_per_layer_fractions():
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    f = moe_fields([1, 3], counts, torch.tensor([0.25, 0.0]), aux_loss=1.1, z_loss=0.5)
    assert f["expert_load"] == [[0.75, 0.25, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
    assert f["dropped_frac"] == 0.125 and f["moe_layers"] == [1, 3] and f["aux_loss"] == 1.1
    line = progress_line({"step": 3, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "mfu": 0.1, **f}, 9)
    assert "step 3/9" in line and "aux 1.100" in line


def test_cpu_peak_is_measured_and_plausible():
    peak = measure_cpu_peak(seconds=0.1, n=256)
    assert 1e8 < peak < 1e13


def test_gpu_peaks_are_the_datasheets_and_an_override_wins():
    # Names as torch.cuda.get_device_name() reports them; NVIDIA datasheets, dense bf16.
    assert gpu_datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_datasheet_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_datasheet_peak("NVIDIA H200", "bf16") == 989e12
    assert gpu_datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_datasheet_peak("NVIDIA A10G", "bf16") == 70e12
    assert gpu_datasheet_peak("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 units: measured instead
    assert device_peak("bf16", override=123e12) == (123e12, "logging.peak_flops")


def test_wandb_gets_the_moe_lists_as_per_expert_series(tmp_path, monkeypatch):
    """Real wandb offline; read back from the run's own transaction log."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = make_run(tmp_path / "run", tmp_path / "no-data", logging={"wandb_mode": "offline"})
    cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    logger = MetricsLogger(run, cfg, flops_per_token=1e6, enabled=True, resumed=False)
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for step in (1, 2):
        logger.log({"step": step, "loss": 3.0, "lr": 1e-3, "tokens_by_source": {"books": 10, "web": 30},
                    **moe_fields([1, 3], counts, torch.tensor([0.25, 0.0]), aux_loss=1.1, z_loss=0.5)},
                   step_seconds=1.0, step_tokens=100)
    logger.close()
    deadline = time.monotonic() + 60  # wandb's core process may still be writing the log after finish() returns
    while not (rows := [r for r in history(run) if r.get("_step") == 2]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rows, history(run)
    row = rows[0]
    assert row["moe/layer1/expert0_load"] == 0.75 and row["moe/layer1/expert1_load"] == 0.25
    assert row["moe/layer3/expert3_load"] == 0.25 and row["moe/layer1/dropped_frac"] == 0.25
    assert row["moe/layer3/dropped_frac"] == 0.0 and row["dropped_frac"] == 0.125
    assert row["tokens_by_source.books"] == 10 and row["loss"] == 3.0 and "mfu" in row
