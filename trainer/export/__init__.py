"""`pretrain export hf CHECKPOINT OUT_DIR`: a checkpoint as a Hugging Face `transformers` model directory,
with the run's tokenizer, for every family (EXPORTERS):
- GPT with dense attention, learned positions and biases: GPT2LMHeadModel (trainer/model/hf.py);
- other GPTs without MoE (GPT-3's alternating attention, no biases, sinusoidal positions, ReLU):
  GPTNeoForCausalLM (trainer/model/hf_neo.py);
- GPT with Switch FFNs: PretrainSwitchForCausalLM, remote code (trust_remote_code=True) written beside the
  weights (trainer/export/modeling_pretrain_switch.py, trainer/export/remote.py);
- encoder-decoders: T5ForConditionalGeneration, SwitchTransformersForConditionalGeneration or MarianMTModel
  (trainer/model/hf_encdec.py); a Switch encoder-decoder routed otherwise than with a fixed capacity per
  sequence (the paper's per-batch capacity) as PretrainSwitchTransformersForConditionalGeneration, the
  library's model with our router, remote code (trainer/export/modeling_pretrain_switch_transformers.py);
- BERT: BertForPreTraining (trainer/model/hf_bert.py).
A config a family cannot express exactly is refused with the reason. The directory is written beside
OUT_DIR, loaded back with transformers (offline, fp32), and renamed to OUT_DIR only when its logits equal
ours (max abs difference <= 1e-4) and its tokenizer encodes as the run's; otherwise it is deleted.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.errors import TrainError
from trainer.export.tokenizer import check_tokenizer, hf_tokenizer
from trainer.pretrained import load_pretrained, recorded_tokenizer

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Exporter:
    auto_class: str  # the transformers Auto class that loads the directory
    build: Callable[[nn.Module, int], nn.Module]  # (our model, eos id) -> the transformers model holding its weights


def with_weights(hf: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """hf in eval mode holding state_dict, which must fill every one of its tensors; ValueError otherwise."""
    missing, unexpected = hf.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not map onto {type(hf).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return hf.eval()


def _library_model(class_name: str, config, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    import transformers

    return with_weights(getattr(transformers, class_name)(config), state_dict)


def _gpt2(model: nn.Module, eos: int) -> nn.Module:
    from trainer.model import hf

    config = hf.hf_config(model.cfg)
    config.bos_token_id = config.eos_token_id = eos
    return _library_model("GPT2LMHeadModel", config, hf.to_hf_state_dict(model))


def _gpt_neo(model: nn.Module, eos: int) -> nn.Module:
    from trainer.model import hf_neo

    return _library_model("GPTNeoForCausalLM", hf_neo.hf_config(model.cfg, eos), hf_neo.to_hf_state_dict(model))


ENCDEC_CLASS = {"t5": "T5ForConditionalGeneration", "marian": "MarianMTModel",
                "switch_transformers": "SwitchTransformersForConditionalGeneration"}


def _encoder_decoder(model: nn.Module, eos: int) -> nn.Module:
    from trainer.model import hf_encdec

    config = hf_encdec.hf_config(model.cfg, eos)
    config.forced_eos_token_id = None  # Marian's default forces id 0 as the last token: we force nothing
    return _library_model(ENCDEC_CLASS[hf_encdec.family(model.cfg)], config, hf_encdec.to_hf_state_dict(model))


def _bert(model: nn.Module, eos: int) -> nn.Module:
    from trainer.model import hf_bert  # the BERT family's mapping: hf_config(cfg), to_hf_state_dict(model)

    return _library_model("BertForPreTraining", hf_bert.hf_config(model.cfg), hf_bert.to_hf_state_dict(model))


def _switch_decoder(model: nn.Module, eos: int) -> nn.Module:
    from trainer.export.remote import remote_switch_model

    return remote_switch_model(model, eos)


def _switch_encoder_decoder(model: nn.Module, eos: int) -> nn.Module:
    from trainer.export.remote import remote_switch_transformers_model

    return remote_switch_transformers_model(model, eos)


EXPORTERS = {
    "gpt2": Exporter("AutoModelForCausalLM", _gpt2),
    "gpt_neo": Exporter("AutoModelForCausalLM", _gpt_neo),
    "pretrain_switch": Exporter("AutoModelForCausalLM", _switch_decoder),
    **{name: Exporter("AutoModelForSeq2SeqLM", _encoder_decoder) for name in ENCDEC_CLASS},
    "pretrain_switch_transformers": Exporter("AutoModelForSeq2SeqLM", _switch_encoder_decoder),
    "bert": Exporter("AutoModelForPreTraining", _bert),
}


def family(cfg: ModelConfig) -> str:
    """The EXPORTERS key for cfg; ValueError naming what the matching transformers class cannot express."""
    from trainer.model import hf, hf_encdec, hf_neo

    if cfg.arch == "encoder_decoder":
        name = hf_encdec.family(cfg, any_routing=True)
        if name == "switch_transformers" and not hf_encdec.routes_per_sequence(cfg):
            return "pretrain_switch_transformers"  # the library's fixed capacity per sequence routes otherwise
        return name
    if cfg.arch != "decoder":
        return "bert"  # the one other architecture: BERT's encoder
    if cfg.moe is not None:
        return "pretrain_switch"
    try:
        hf.check_hf_compatible(cfg)
        return "gpt2"
    except ValueError:
        hf_neo.check_neo_compatible(cfg)
        return "gpt_neo"


def check_inputs(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Two random sequences, long enough to cross a banded layer's window."""
    g = torch.Generator().manual_seed(0)
    length = min(cfg.n_ctx, max(64, cfg.local_window + 32) if cfg.attention == "alternating" else 64)
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (2, length), generator=g)}
    if cfg.arch == "encoder_decoder":
        inputs["decoder_input_ids"] = torch.randint(0, cfg.vocab_size, (2, min(cfg.n_ctx, 32)), generator=g)
    return inputs


@torch.no_grad()
def logits_difference(ours: nn.Module, hf: nn.Module, cfg: ModelConfig) -> float:
    """Max abs difference of our and the transformers model's logits (fp32, eval mode) on check_inputs."""
    inputs = check_inputs(cfg)
    if cfg.arch == "encoder_decoder":
        mine = ours(inputs["input_ids"], decoder_inputs=inputs["decoder_input_ids"]).logits
    else:
        mine = ours(inputs["input_ids"]).logits
    out = hf(**inputs, use_cache=False)
    theirs = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
    return (mine - theirs).abs().max().item()


def _write(model: nn.Module, cfg, tmp: Path, exporter: Exporter) -> str:
    """The model and tokenizer into tmp, then both checked as a user would load them from there; the
    transformers class written."""
    import transformers

    record = recorded_tokenizer(cfg)
    try:
        exporter.build(model, int(record["eot_id"])).save_pretrained(tmp)
    except ValueError as e:
        raise TrainError(str(e)) from None
    hf_tokenizer(record, cfg.model.vocab_size, cfg.model.n_ctx).save_pretrained(tmp)
    loaded = getattr(transformers, exporter.auto_class).from_pretrained(
        tmp, dtype=torch.float32, local_files_only=True, trust_remote_code=True).eval()
    diff = logits_difference(model, loaded, cfg.model)
    if not diff <= TOLERANCE:
        raise TrainError(f"export check failed: the exported model's logits differ from ours by {diff:.2e} "
                         f"(more than {TOLERANCE:g})")
    check_tokenizer(tmp, record, cfg.model.vocab_size)
    return type(loaded).__name__


def export_hf(path: str | Path, out_dir: str | Path) -> tuple[Path, str]:
    """(OUT_DIR, the transformers class written); TrainError naming the reason for a model we cannot export."""
    model, cfg, step_dir = load_pretrained(path)
    try:
        exporter = EXPORTERS[family(cfg.model)]
    except ValueError as e:
        raise TrainError(f"{step_dir}: {e}") from None
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"{out}: exists and is not an empty directory (export writes a new one)")
    tmp = out.with_name(out.name + "-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        class_name = _write(model, cfg, tmp, exporter)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out, class_name
