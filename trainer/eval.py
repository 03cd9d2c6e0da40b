"""`pretrain eval RUN_DIR|CHECKPOINT`: held-out loss and perplexity on the documents the key-hash split
kept out of training, and in-context few-shot accuracy (Brown et al. 2020) on two tasks generated
here, so no benchmark download is needed:
- two-digit addition, GPT-3's prompt format ("Q: What is 48 plus 76? A: 124");
- next-word prediction on held-out sentences (LAMBADA-style: the last word of a sentence).
Each is scored zero-shot, one-shot and few-shot; an answer counts when greedy decoding reproduces it
(one teacher-forced pass: trainer/scoring.py). Everything runs in batches on the accelerator when there
is one.
A span-corruption (encoder-decoder) or BERT run reports the held-out loss of the targets its objective
makes of the held-out documents (the run's seed, so the same every time; BERT: the MLM loss), and no
few-shot tasks: those prompt a decoder-only LM.
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Optional

import torch

from shard_format import TokenizerError, TokenizerRecord, encoding_for
from trainer.config import RunConfig
from trainer.data import Objective, heldout_batches, load_manifest, objective_for
from trainer.errors import TrainError
from trainer.pretrained import load_pretrained, recorded_tokenizer
from trainer.scoring import continuation_logprobs, device_of
from trainer.special_tokens import EOT


def load_tokenizer(manifest_tokenizer: TokenizerRecord, path: Optional[str]):
    """The manifest's tokenizer (`shard_format.encoding_for`); a failure is one TrainError line."""
    try:
        return encoding_for(manifest_tokenizer, path)
    except TokenizerError as e:
        raise TrainError(f"tokenizer: {e} (give a .tiktoken file: --tokenizer, or tokenizer=FILE in lm-eval's "
                         f"--model_args)") from None


def run_tokenizer(cfg: RunConfig, path: Optional[str]):
    """The tokenizer the run's data manifest records; where the data dir is gone, GPT-2's BPE from `path`."""
    try:
        record = recorded_tokenizer(cfg)
    except TrainError as e:
        if path is None:
            raise TrainError(f"{e}; or give GPT-2's .tiktoken file") from None
        record = {"name": "gpt2", "eot_id": EOT}
    return load_tokenizer(record, path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def heldout_loss(model, batches: list[torch.Tensor], objective: Objective) -> dict:
    """Mean loss over every predicted token of `batches`, each run on the model's device."""
    if not batches:
        raise TrainError("no held-out documents: raise data.heldout_percent (they are chosen by key hash)")
    device = device_of(model)
    total, n = 0.0, 0
    for b in batches:
        *inputs, targets = objective.split(b)  # BERT's call takes token types, a mask and NSP labels too
        predicted = objective.predicted(targets)
        total += model(*(x.to(device) for x in inputs), targets.to(device)).ce_loss.item() * predicted
        n += predicted
    loss = total / n
    return {"heldout_loss": loss, "heldout_perplexity": math.exp(loss), "heldout_tokens": n}


def addition_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [(f"Q: What is {a} plus {b}? A:", f" {a + b}") for a, b in pairs]


def next_word_examples(text: str, rng: random.Random, n: int) -> list[tuple[str, str]]:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    usable = [s for s in sentences if 6 <= len(s.split()) <= 40 and re.fullmatch(r".*\s\w+[.!?]", s)]
    rng.shuffle(usable)
    out = []
    for s in usable[:n]:
        body, last = s[:-1].rsplit(" ", 1)
        out.append((body, f" {last}"))
    return out


def few_shot_accuracy(model, enc, examples: list[tuple[str, str]], shots: int, n_ctx: int, seed: int,
                      batch_size: int) -> float:
    """Each query is preceded by `shots` other solved examples of the same task, one per line; the prompt
    keeps its last n_ctx - len(answer) tokens."""
    rng = random.Random(seed)
    requests = []
    for i, (prompt, answer) in enumerate(examples):
        others = [e for j, e in enumerate(examples) if j != i]
        context = "".join(p + a + "\n" for p, a in rng.sample(others, min(shots, len(others))))
        target = enc.encode_ordinary(answer)
        requests.append((enc.encode_ordinary(context + prompt)[-(n_ctx - len(target)):], target))
    greedy = [g for _, g in continuation_logprobs(model, requests, batch_size, enc.eot_token)]
    return sum(greedy) / len(examples) if examples else float("nan")


def evaluate(path: str | Path, tokenizer: Optional[str] = None, max_batches: int = 20, n_examples: int = 50,
             shots: tuple[int, ...] = (0, 1, 5), seed: int = 0, batch_size: Optional[int] = None,
             device: Optional[str] = None) -> dict:
    """Held-out loss over `max_batches` micro-batches of train.micro_batch_size windows, and few-shot
    accuracy; `batch_size` windows or examples per forward pass (default: the micro-batch size) on
    `device` (default: cuda when there is one)."""
    model, cfg, step_dir = load_pretrained(path)
    model.to(device or default_device())
    batch_size = batch_size or cfg.train.micro_batch_size
    manifest = load_manifest(cfg.data.path, cfg.model.vocab_size, cfg.data.weights)
    objective = objective_for(cfg.train, manifest)
    batches = heldout_batches(manifest, objective, cfg.train.micro_batch_size, cfg.data.heldout_percent, max_batches)
    windows = list(torch.cat(batches).split(batch_size)) if batches else []
    result = {"checkpoint": str(step_dir), "objective": cfg.train.objective, **heldout_loss(model, windows, objective)}
    if cfg.train.objective != "causal_lm":
        return result
    enc = load_tokenizer(manifest.tokenizer, tokenizer)
    rng = random.Random(seed)
    text = " ".join(enc.decode([t for t in b.flatten().tolist() if t != manifest.eot_id]) for b in batches)
    tasks = {"addition_2digit": addition_examples(rng, n_examples), "next_word": next_word_examples(text, rng, n_examples)}
    n_ctx = min(cfg.model.n_ctx, cfg.train.seq_len)
    result["few_shot"] = {name: {f"{k}-shot": few_shot_accuracy(model, enc, ex, k, n_ctx, seed, batch_size)
                                 for k in shots} for name, ex in tasks.items()}
    result["few_shot_examples"] = {name: len(ex) for name, ex in tasks.items()}
    return result
