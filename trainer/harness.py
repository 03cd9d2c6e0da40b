"""EleutherAI's lm-evaluation-harness (`lm-eval`) for our checkpoints: the model `pretrain`.

    pretrain lm-eval --model pretrain --model_args checkpoint=RUN_DIR --tasks lambada_openai,hellaswag --batch_size 16

lm-eval finds a model only once its module is imported, so `pretrain lm-eval` (or `python -m
trainer.harness`) imports this one and hands every argument to lm-eval's own CLI. model_args:
`checkpoint` (a run dir, its newest complete checkpoint, or a step dir), `device` (default cuda when
there is one), `dtype` (float32, bfloat16 or float16), `tokenizer` (GPT-2's .tiktoken file, where the
run's data manifest no longer names one), `max_gen_toks` (default 256).

Decoders answer all three request types; an encoder-decoder only loglikelihood (the context to the
encoder, the continuation as the decoder's targets: trainer/scoring.py): a rolling likelihood or free
generation of text is not what its span-corruption training made it for, so those are refused.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from trainer.errors import TrainError
from trainer.eval import default_device, run_tokenizer
from trainer.pretrained import load_pretrained
from trainer.scoring import continuation_logprobs, device_of, padded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLING_KEYS = {"top_k"}  # besides lm-eval's normalised until, max_gen_toks, do_sample and temperature


def next_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """Argmax at temperature 0, else a draw from softmax(logits / temperature) over the top_k logits."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, stop: Callable[[list[int]], bool] = lambda new: False,
             vocab: Optional[int] = None) -> list[list[int]]:
    """The new tokens of each prompt, ids below `vocab` (what the tokenizer decodes; a model's table may be
    larger); a row ends after max_new_tokens or once stop(its new tokens). Without a KV cache: each step
    reruns the unfinished rows, right-padded (causal attention keeps the padding out of each row's last
    real position)."""
    device = device_of(model)
    rows, new = [list(p) for p in prompts], [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        last = torch.tensor([len(rows[i]) - 1 for i in active], device=device)
        logits = model(padded([rows[i] for i in active], 0, device)).logits
        last_logits = logits[torch.arange(len(active), device=device), last, :vocab].float()
        chosen = next_tokens(last_logits, temperature, top_k)
        for i, token in zip(active, chosen.tolist()):
            rows[i].append(token)
            new[i].append(token)
        active = [i for i in active if not stop(new[i])]
    return new


@register_model("pretrain")
class PretrainLM(TemplateLM):
    """A `pretrain` checkpoint as an lm-eval model, with the tokenizer its data run recorded."""

    def __init__(self, checkpoint: str, batch_size: int | str = 1, device: Optional[str] = None,
                 dtype: str = "float32", tokenizer: Optional[str] = None, max_gen_toks: int = 256):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise TrainError(f"batch_size {batch_size!r}: give a positive number (no 'auto' for --model pretrain)")
        if dtype not in DTYPES:
            raise TrainError(f"model_args dtype={dtype}: one of {', '.join(DTYPES)}")
        model, cfg, self.step_dir = load_pretrained(checkpoint)
        self._device = torch.device(device) if device else default_device()
        self.model = model.to(self._device, DTYPES[dtype])
        self.enc = run_tokenizer(cfg, tokenizer)
        self.backend = "seq2seq" if cfg.model.arch == "encoder_decoder" else "causal"
        self.batch_size, self.max_length, self.max_gen_toks = int(batch_size), cfg.model.n_ctx, int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.enc.eot_token

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # <|endoftext|> in the text is the special token, as Hugging Face's GPT-2 tokenizer reads it.
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.enc.decode(tokens)

    def score(self, requests: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), disable=disable_tqdm, desc="pretrain: scoring") as bar:
            return continuation_logprobs(self.model, requests, self.batch_size, self.eot_token_id, bar.update)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = self.score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def require_decoder(self, request_type: str) -> None:
        if self.backend == "seq2seq":
            raise TrainError(f"{request_type}: {self.step_dir} is an encoder-decoder; --model pretrain scores it on "
                             f"loglikelihood tasks (multiple choice, continuation likelihood) only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text in windows of n_ctx predicted tokens, the first after EOT (lm-eval's rolling windows)."""
        self.require_decoder("loglikelihood_rolling")
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for window in map(make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, Optional[int]]:
        """(stop strings with EOT's text, max new tokens, temperature (0: greedy), top_k) of a request."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until"), eos=self.tok_decode([self.eot_token_id]))
        max_gen_toks, do_sample = kwargs.pop("max_gen_toks"), kwargs.pop("do_sample")
        temperature = float(kwargs.pop("temperature", 0.0))
        if unknown := sorted(set(kwargs) - SAMPLING_KEYS):
            raise TrainError(f"generation_kwargs {unknown}: --model pretrain knows until, max_gen_toks, do_sample, "
                             f"temperature and top_k")
        if max_gen_toks >= self.max_length:
            raise TrainError(f"max_gen_toks {max_gen_toks}: leaves no room for a prompt in n_ctx={self.max_length}")
        return until, max_gen_toks, temperature if do_sample else 0.0, kwargs.get("top_k")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same generation settings, longest prompt first (lm-eval's Collator);
        each prompt keeps its last n_ctx - max_gen_toks tokens."""
        self.require_decoder("generate_until")
        collator = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        out = []
        for chunk in tqdm(collator.get_batched(n=self.batch_size), disable=disable_tqdm, desc="pretrain: generating"):
            contexts, all_kwargs = zip(*chunk)
            until, max_gen_toks, temperature, top_k = self.generation_settings(all_kwargs[0])
            prompts = [self.tok_encode(c)[-(self.max_length - max_gen_toks):] or [self.eot_token_id] for c in contexts]
            new_tokens = generate(self.model, prompts, max_gen_toks, temperature, top_k, vocab=self.enc.n_vocab,
                                  stop=lambda new: any(s in self.tok_decode(new) for s in until))
            for context, kwargs, new in zip(contexts, all_kwargs, new_tokens):
                text = postprocess_generated_text(self.tok_decode(new), until, None)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                out.append(text)
        return collator.get_original(out)


def main(argv: list[str]) -> None:
    """lm-eval's own command line, with `--model pretrain` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main(sys.argv[1:])
