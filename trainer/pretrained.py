"""A trained model from a checkpoint, for everything that uses one outside training (eval, export)."""
from __future__ import annotations

from pathlib import Path

import yaml

from trainer import checkpoint
from trainer.config import RunConfig


def load_pretrained(path: str | Path):
    """(model in eval mode with the checkpoint's consolidated fp32 weights, run config, step dir)."""
    from trainer.model import model_for

    step_dir = checkpoint.resolve(path)
    cfg = RunConfig.model_validate(yaml.safe_load((step_dir / "config.yaml").read_text()))
    model = model_for(cfg.model)
    checkpoint.load_into(model, step_dir)
    return model.eval(), cfg, step_dir
