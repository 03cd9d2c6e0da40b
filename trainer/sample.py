"""`pretrain sample CHECKPOINT --prompt TEXT`: a continuation of the prompt, decoded with a KV cache.

A decoder-only model reads the prompt once (filling its cache; an empty prompt starts from the end-of-text
token, as GPT-2's unconditional samples do), then one token per step. An encoder-decoder encodes the
prompt followed by EOS (span corruption's inputs end so; write `<extra_id_0>` where a span is missing)
and decodes from `decoder_start_token_id`. Each step picks the argmax (temperature 0) or draws from
softmax(logits / temperature) over the top k, with a generator seeded by `seed`; decoding stops after
max_new_tokens or at the end-of-text token, as `transformers`' generate does with the exported
model's eos_token_id. Mixture-of-experts layers drop no token while decoding (trainer/model/moe.py).
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from shard_format import EOT_TEXT, TokenizerError, encoding_for
from trainer.errors import TrainError
from trainer.pretrained import load_pretrained, recorded_tokenizer
from trainer.special_tokens import NAMES


def next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator: torch.Generator) -> int:
    """The argmax of logits (V,) at temperature 0, else a draw from softmax(logits / temperature) over the top k."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


@torch.no_grad()
def decode_steps(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, seed: int = 0,
                 stop_id: Optional[int] = None, vocab: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(token, the logits (V,) it was picked from) for each new token; the model is in eval mode.
    vocab: pick among the first `vocab` ids only (what a tokenizer decodes, where the table is larger)."""
    device = model.lm_head.weight.device
    cache = model.new_cache()
    prompt_ids = torch.tensor([prompt], device=device)
    if model.cfg.arch == "encoder_decoder":
        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(prompt_ids, decoder_inputs=ids, cache=cache).logits[0, -1]
        first = torch.tensor([[model.cfg.decoder_start_token_id]], device=device)
    else:
        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(ids, cache=cache).logits[0, -1]
        first = prompt_ids
    generator = torch.Generator(device).manual_seed(seed)
    token = None
    for i in range(max_new_tokens):
        logits = step(first if i == 0 else torch.tensor([[token]], device=device))[:vocab]
        token = next_token(logits, temperature, top_k, generator)
        yield token, logits
        if token == stop_id:
            return


def generate(model, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    """The new tokens of decode_steps."""
    return [token for token, _ in decode_steps(model, prompt, max_new_tokens, **kw)]


class Codec:
    """The run's tokenizer, plus the names of the ids after its vocabulary (<pad>, <extra_id_N>) that fit
    the model, so prompts and outputs can show them; <|endoftext|> is one token both ways."""

    def __init__(self, encoding, vocab_size: int):
        self.encoding = encoding
        self.special = {EOT_TEXT: encoding.eot_token} | {name: i for i, name in NAMES.items() if i < vocab_size}
        self.names = {i: name for name, i in self.special.items()}
        self.pattern = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.split(text):
            ids += [self.special[piece]] if piece in self.special else self.encoding.encode_ordinary(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        pieces = []
        for special, run in itertools.groupby(ids, key=lambda i: i in self.names):
            pieces += [self.names[i] for i in run] if special else [self.encoding.decode(list(run), errors="replace")]
        return "".join(pieces)


@dataclass
class Sample:
    prompt_ids: list[int]
    ids: list[int]  # the new tokens
    text: str  # their text
    seconds: float
    device: str


def prompt_ids(codec: Codec, cfg, prompt: str, max_new_tokens: int) -> list[int]:
    """The model's input for `prompt`; TrainError when it or the new tokens overflow a position table."""
    m, eot = cfg.model, codec.encoding.eot_token
    if m.arch == "encoder_decoder":
        ids = codec.encode(prompt) + [eot]
        sinusoidal = m.pos_embedding == "sinusoidal"  # relative positions have no table
        lengths = {"the prompt": len(ids), "--max-new-tokens": max_new_tokens} if sinusoidal else {}
    else:
        ids = codec.encode(prompt) or [eot]
        lengths = {"the prompt plus --max-new-tokens": len(ids) + max_new_tokens}
    for what, n in lengths.items():
        if n > m.n_ctx:
            raise TrainError(f"{what} ({n} tokens) exceeds the position table model.n_ctx={m.n_ctx}")
    return ids


def sample_checkpoint(path: str | Path, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                      top_k: Optional[int] = None, seed: int = 0, device: Optional[str] = None) -> Sample:
    """Load the checkpoint (on the GPU when there is one) and its run's tokenizer, and continue `prompt`."""
    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise TrainError(f"--max-new-tokens {max_new_tokens}, --temperature {temperature}, --top-k {top_k}: "
                         "need at least 1 new token, a temperature >= 0 and k >= 1")
    model, cfg, _ = load_pretrained(path)
    try:
        codec = Codec(encoding_for(recorded_tokenizer(cfg)), cfg.model.vocab_size)
    except TokenizerError as e:
        raise TrainError(f"tokenizer: {e}") from None
    ids = prompt_ids(codec, cfg, prompt, max_new_tokens)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    start = time.perf_counter()
    new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   stop_id=codec.encoding.eot_token)
    return Sample(ids, new, codec.decode(new), time.perf_counter() - start, device)
