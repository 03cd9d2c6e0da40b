"""`pretrain export hf CHECKPOINT OUT_DIR`: a checkpoint as a `transformers` GPT-2 model directory
(dense models with dense attention and learned positions: what GPT2LMHeadModel can express)."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer import checkpoint
from trainer.configio import read_run_config
from trainer.errors import TrainError


def load_model(path: str | Path):
    """(model in eval mode with the checkpoint's consolidated fp32 weights, run config, step dir)."""
    from trainer.model.gpt import GPT

    step_dir = checkpoint.resolve(path)
    cfg = read_run_config(step_dir / "config.yaml")
    model = GPT(cfg.model)
    model.load_state_dict(checkpoint.fit_to_model(model, checkpoint.consolidate(step_dir), step_dir), strict=True)
    return model.eval(), cfg, step_dir


def export_hf(path: str | Path, out_dir: str | Path) -> Path:
    from transformers import GPT2LMHeadModel

    from trainer.model.hf import hf_config, to_hf_state_dict

    model, cfg, step_dir = load_model(path)
    try:
        config = hf_config(cfg.model)
    except ValueError as e:
        raise TrainError(f"{step_dir}: {e}") from None
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    # HF keeps the causal masks as buffers in some versions; nothing else may be left out.
    if [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))] or unexpected:
        raise TrainError(f"{step_dir}: weights do not map onto GPT-2: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = Path(out_dir)
    hf.save_pretrained(out)
    with torch.no_grad():
        x = torch.arange(min(16, cfg.model.n_ctx)).unsqueeze(0) % cfg.model.vocab_size
        diff = (model(x).logits - hf.eval()(x).logits).abs().max().item()
    if diff > 1e-4:
        raise TrainError(f"export check failed: exported logits differ from ours by {diff:.2e}")
    return out
