"""EleutherAI's lm-evaluation-harness (`lm-eval`) for our checkpoints: the model `pretrain`.

    lm_eval --model pretrain --model_args checkpoint=RUN_DIR --tasks lambada_openai,hellaswag --batch_size 16

The install's pretrain_lm_eval_hook.pth registers the model with lm-eval (pretrain_lm_eval_hook.py);
`pretrain lm-eval` (or `python -m trainer.harness`) registers it too, then hands every argument to
lm-eval's own CLI, so it works from a source tree that was never installed. model_args:
`checkpoint` (a run dir, its newest complete checkpoint, or a step dir), `device` (default cuda when
there is one), `dtype` (float32, bfloat16 or float16), `tokenizer` (GPT-2's .tiktoken file, where the
run's data manifest no longer names one), `max_gen_toks` (default 256).

Decoders answer all three request types; an encoder-decoder only loglikelihood (the context to the
encoder, the continuation as the decoder's targets: trainer/scoring.py): a rolling likelihood or free
generation of text is not what its span-corruption training made it for, so those are refused.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from trainer.errors import TrainError
from trainer.eval import default_device, run_tokenizer
from trainer.pretrained import load_pretrained
from trainer.sample import decode_steps
from trainer.scoring import continuation_logprobs

import pretrain_lm_eval_hook

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLING_KEYS = {"top_k"}  # besides lm-eval's normalised until, max_gen_toks, do_sample and temperature


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
        """Each prompt's last n_ctx - max_gen_toks tokens, decoded one request at a time with a KV cache
        (trainer/sample.py, as `pretrain sample`) until a stop string, EOT or max_gen_toks; a sampling
        request's seed is drawn from torch's global generator, which lm-eval's --seed sets."""
        self.require_decoder("generate_until")
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="pretrain: generating"):
            context, kwargs = req.args
            until, max_gen_toks, temperature, top_k = self.generation_settings(kwargs)
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.eot_token_id]
            seed = int(torch.randint(2**62, ())) if temperature else 0
            new = []
            for token, _ in decode_steps(self.model, prompt, max_gen_toks, temperature, top_k, seed,
                                         stop_id=self.eot_token_id, vocab=self.enc.n_vocab):
                new.append(token)
                if any(stop in self.tok_decode(new) for stop in until):
                    break
            text = postprocess_generated_text(self.tok_decode(new), until, None)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out


# lm-eval finds the model by this placeholder, also where no install put the hook's .pth in site-packages.
pretrain_lm_eval_hook.register()


def main(argv: list[str]) -> None:
    """lm-eval's own command line, with `--model pretrain` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main(sys.argv[1:])
