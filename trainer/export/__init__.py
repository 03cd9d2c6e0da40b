"""`pretrain export hf CHECKPOINT OUT_DIR`: a checkpoint as a `transformers` GPT-2 model directory
(dense models with dense attention and learned positions: what GPT2LMHeadModel can express)."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import TrainError
from trainer.pretrained import load_pretrained


def export_hf(path: str | Path, out_dir: str | Path) -> Path:
    from transformers import GPT2LMHeadModel

    from trainer.model.hf import hf_config, to_hf_state_dict

    model, cfg, step_dir = load_pretrained(path)
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
