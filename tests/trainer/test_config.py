"""Config schemas and loading: shipped configs validate, overrides apply, and every invalid
config is refused with one message naming the file and the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.configio import ConfigError, load_model_config, load_run_config
from trainer.configio import dump_yaml, read_run_config
from trainer.errors import TrainError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_YAMLS = sorted((CONFIGS / "model").glob("*.yaml"))
GPT3_SIZES = ["125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b", "175b"]
SWITCH_SIZES = ["base-8", "base-128", "large-128", "c-2048"]
ENCODER_DECODERS = ["transformer-base", "transformer-big", "t5-small", "t5-base", "t5-large",
                    *(f"switch-t5-{s}" for s in SWITCH_SIZES), "tiny-transformer", "tiny-t5", "tiny-switch-t5"]


def write_run(tmp_path: Path, **sections) -> Path:
    data = {"model": str(CONFIGS / "model" / "tiny-switch.yaml"), "data": {"path": "runs/demo/data"},
            "train": {"seq_len": 64, "micro_batch_size": 2, "global_batch_size": 4}}
    for name, value in sections.items():
        if value and isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_listed_config_is_shipped():
    names = {p.stem for p in MODEL_YAMLS}
    expected = {f"gpt3-{s}" for s in GPT3_SIZES} | {f"switch-{s}" for s in SWITCH_SIZES} | \
        {"tiny-gpt", "tiny-switch", *ENCODER_DECODERS}
    assert expected <= names


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_model_configs_validate(path):
    cfg = load_model_config(path)
    assert cfg.d_model % cfg.n_head == 0
    # GPT-2's vocabulary, plus the special ids the objective appends (trainer/special_tokens.py); an
    # encoder-decoder starts its decoder from PAD.
    assert cfg.arch == ("encoder_decoder" if cfg.name in ENCODER_DECODERS else "encoder" if "bert" in cfg.name
                        else "decoder")
    assert cfg.vocab_size == {"decoder": 50257, "encoder_decoder": 50358, "encoder": 50361}[cfg.arch]
    assert cfg.decoder_start_token_id == (50257 if cfg.arch == "encoder_decoder" else 0)
    if cfg.name.startswith("switch"):
        assert cfg.moe is not None and cfg.moe.eval_capacity_factor == 2.0


def test_switch_expert_frequency():
    base = load_model_config(CONFIGS / "model" / "switch-t5-base-128.yaml")
    c = load_model_config(CONFIGS / "model" / "switch-t5-c-2048.yaml")
    assert [base.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert all(c.is_moe_layer(i) for i in range(c.n_layer))
    assert c.moe.num_experts == 2048 and c.d_model == 2080


def test_override_applies_and_parses_types(tmp_path):
    cfg = load_run_config(write_run(tmp_path), ["train.lr=3e-4", "parallel.zero_stage=2", "model.n_layer=4",
                                                 "logging.wandb_mode=disabled"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.parallel.zero_stage == 2 and cfg.model.n_layer == 4
    assert cfg.logging.wandb_mode == "disabled"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(write_run(tmp_path))
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(cfg))
    assert read_run_config(saved).model_dump(mode="json") == cfg.model_dump(mode="json")


def test_batch_arithmetic_gives_accumulation(tmp_path):
    cfg = load_run_config(write_run(tmp_path, train={"global_batch_size": 16, "micro_batch_size": 2}))
    assert cfg.for_world(2).gradient_accumulation == 4


def test_a_config_laid_out_for_another_world_size_is_refused(tmp_path):
    cfg = load_run_config(write_run(tmp_path)).for_world(2)
    assert cfg.parallel.data_parallel_size == 2
    with pytest.raises(TrainError, match=r"^parallel.data_parallel_size: 2, but 1 processes were started$"):
        cfg.for_world(1)


BAD = [
    ("unknown key", dict(train={"lrr": 1e-3}), [], "train.lrr: unknown key"),
    ("unknown section", dict(optimizer={"name": "adam"}), [], "optimizer: unknown key"),
    ("wrong type", dict(train={"max_steps": "many"}), [], "train.max_steps"),
    ("heads do not divide width", {}, ["model.n_head=5"], "model.n_head"),
    ("experts vs ep size", dict(parallel={"ep_size": 3}), [], "parallel.ep_size"),
    ("ep size on a dense model", dict(model=str(CONFIGS / "model" / "tiny-gpt.yaml"), parallel={"ep_size": 2}), [],
     "parallel.ep_size"),
    ("global batch not a multiple of micro", dict(train={"global_batch_size": 5}), [], "train.global_batch_size"),
    ("batch != micro x accum x dp", dict(parallel={"data_parallel_size": 2},
                                         train={"gradient_accumulation_steps": 3}), [], "train.global_batch_size"),
    ("ep size vs data-parallel size", dict(parallel={"ep_size": 4, "data_parallel_size": 6}), [],
     "parallel.ep_size: 4 does not divide the data-parallel size 6"),
    ("sequence longer than positions", dict(train={"seq_len": 4096}), [], "train.seq_len"),
    ("zero stage out of range", dict(parallel={"zero_stage": 4}), [], "parallel.zero_stage"),
    ("unknown precision", dict(train={"precision": "fp8"}), [], "train.precision"),
    ("dropout out of range", {}, ["model.dropout=1.5"], "model.dropout"),
    ("moe frequency zero", {}, ["model.moe.every=0"], "model.moe.every"),
    ("missing data path", dict(data={}), [], "data.path: required key is missing"),
    ("wandb mode", dict(logging={"wandb_mode": "cloud"}), [], "logging.wandb_mode"),
    ("model file missing", dict(model="no-such-model.yaml"), [], "model"),
]


@pytest.mark.parametrize("sections,overrides,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_config_is_refused_naming_file_and_key(tmp_path, sections, overrides, expected):
    path = write_run(tmp_path, **sections)
    with pytest.raises(ConfigError) as err:
        load_run_config(path, overrides)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("text,message", [("model: [unclosed", "not valid YAML"), ("- a\n- b\n", "top level")])
def test_malformed_yaml_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1"])
def test_malformed_override_is_refused(tmp_path, override):
    with pytest.raises(ConfigError, match="--set"):
        load_run_config(write_run(tmp_path), [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
