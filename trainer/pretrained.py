"""A trained model from a checkpoint, for everything that uses one outside training (eval, export, sample)."""
from __future__ import annotations

from pathlib import Path

import yaml

from shard_format import ManifestError, TokenizerRecord
from shard_format import load_manifest as load_shard_manifest
from trainer import checkpoint
from trainer.config import RunConfig
from trainer.errors import TrainError


def load_pretrained(path: str | Path):
    """(model in eval mode with the checkpoint's consolidated fp32 weights, run config, step dir)."""
    from trainer.model import model_for

    step_dir = checkpoint.resolve(path)
    cfg = RunConfig.model_validate(yaml.safe_load((step_dir / "config.yaml").read_text()))
    model = model_for(cfg.model)
    checkpoint.load_into(model, step_dir)
    return model.eval(), cfg, step_dir


def recorded_tokenizer(cfg: RunConfig) -> TokenizerRecord:
    """The tokenizer the run's data manifest records (name, vocab size, end-of-text id, vocabulary file)."""
    try:
        return load_shard_manifest(cfg.data.path)["tokenizer"]
    except ManifestError as e:
        raise TrainError(f"data.path: {e} (the run's tokenizer is recorded there)") from None
